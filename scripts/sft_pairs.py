#!/usr/bin/env python3
"""Builds an SFT-shaped set from reStructuredText documents (the Python docs corpus): every section becomes one
pair, prompt = the section's title and its opening paragraph, response = the rest of the section. Sections are
held out by source file, so a held-out pair's file is in neither the SFT training pairs nor the pre-training text.

    sft_pairs.py ../shared/data/python-3.11-docs.jsonl.xz --out DIR [--holdout-fraction 0.1] [--seed 1]
writes DIR/sft-train.jsonl and DIR/sft-heldout.jsonl ({"prompt", "response"}: `moba prep --sft`) and
DIR/pretrain.jsonl ({"text"}: the training files whole, for pre-training on the same distribution)."""
import argparse
import json
import lzma
import os
import re
import sys
import zlib

# A section adornment: one punctuation character repeated (reStructuredText allows any of these).
ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")


def is_title(lines, i):
    """True when lines[i] is a section title: non-blank, not indented, underlined by an adornment at least as
    long (an overline, when present, is the same adornment)."""
    if i + 1 >= len(lines):
        return False
    title, under = lines[i].rstrip(), lines[i + 1].rstrip()
    if not title or title[0].isspace() or ADORNMENT.match(title) or not ADORNMENT.match(under):
        return False
    return len(under) >= len(title)


def sections(text):
    """(title, body) for every section of a document, in order; text before the first title is dropped."""
    lines = text.split("\n")
    starts = [i for i in range(len(lines)) if is_title(lines, i)]
    out = []
    for n, i in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        if n + 1 < len(starts) and end > 0 and ADORNMENT.match(lines[end - 1].rstrip()):
            end -= 1  # the next title's overline
        out.append((lines[i].strip(), "\n".join(lines[i + 2:end])))
    return out


def split_opening(body):
    """(opening paragraph, rest): the first block of non-blank lines, and what follows it."""
    text = body.strip("\n")
    match = re.search(r"\n[ \t]*\n", text)
    if not match:
        return text, ""
    return text[:match.start()], text[match.end():].strip("\n")


def pair_of(title, body, min_response):
    opening, rest = split_opening(body)
    if not opening.strip() or len(rest.encode()) < min_response:
        return None
    return {"prompt": f"{title}\n\n{opening}\n\n", "response": rest + "\n"}


def is_held_out(doc_id, fraction, seed):
    return zlib.crc32(f"{seed}:{doc_id}".encode()) / 2**32 < fraction


def read_documents(path):
    opener = lzma.open if path.endswith(".xz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                doc = json.loads(line)
                if "text" not in doc:
                    raise ValueError(f"{path}:{number}: no \"text\" member")
                yield doc.get("id", f"line{number}"), doc["text"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSON Lines ({\"id\", \"text\"}), optionally .xz")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--holdout-fraction", type=float, default=0.1, help="fraction of source files held out")
    ap.add_argument("--seed", type=int, default=1, help="seed of the held-out choice")
    ap.add_argument("--min-response", type=int, default=200, help="drop sections whose response has fewer bytes")
    args = ap.parse_args()
    if not 0 <= args.holdout_fraction < 1:
        print(f"error: --holdout-fraction {args.holdout_fraction} is outside [0, 1)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    counts = {"files": 0, "held_out_files": 0, "train": 0, "heldout": 0, "prompt_bytes": 0, "response_bytes": 0}
    paths = {k: os.path.join(args.out, f) for k, f in
             (("train", "sft-train.jsonl"), ("heldout", "sft-heldout.jsonl"), ("pretrain", "pretrain.jsonl"))}
    files = {k: open(p + ".tmp", "w", encoding="utf-8") for k, p in paths.items()}
    try:
        for path in args.inputs:
            for doc_id, text in read_documents(path):
                held = is_held_out(doc_id, args.holdout_fraction, args.seed)
                counts["files"] += 1
                counts["held_out_files"] += held
                if not held:
                    files["pretrain"].write(json.dumps({"id": doc_id, "text": text}) + "\n")
                for title, body in sections(text):
                    pair = pair_of(title, body, args.min_response)
                    if pair:
                        split = "heldout" if held else "train"
                        files[split].write(json.dumps(pair) + "\n")
                        counts[split] += 1
                        counts["prompt_bytes"] += len(pair["prompt"].encode())
                        counts["response_bytes"] += len(pair["response"].encode())
    except (OSError, ValueError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for f in files.values():
            f.close()
    if counts["train"] == 0 or counts["heldout"] == 0:
        print(f"error: no {'training' if counts['train'] == 0 else 'held-out'} pairs: too few sections or files "
              f"(try another --holdout-fraction)", file=sys.stderr)
        return 1
    for k, p in paths.items():
        os.replace(p + ".tmp", p)
    pairs = counts["train"] + counts["heldout"]
    print(f"{counts['files']} files ({counts['held_out_files']} held out) -> {counts['train']} training and "
          f"{counts['heldout']} held-out pairs; mean prompt {counts['prompt_bytes'] / pairs:.0f} bytes, mean response "
          f"{counts['response_bytes'] / pairs:.0f} bytes")
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/sft_pairs.py + `moba prep --sft`: reStructuredText sections become (title + opening paragraph,
rest) pairs, held out by source file; after prep, the loss mask is 0 on exactly the prompt's tokens and 1 on the
response and EOS, for every pair of the bundled Python-docs sample."""
import json
import os
import sys
import unittest

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import support  # noqa: E402

sys.path.insert(0, support.SCRIPTS)
import sft_pairs  # noqa: E402

RST = """.. _label:

**************
Document Title
**************

Intro paragraph
of two lines.

Rest of the intro.

Section One
===========

First paragraph of one.

Body of one,
continued.

.. note:: a directive

Sub-section
-----------
Only one paragraph here.

Short
=====

Opening.

tiny
"""


class SftPairs(unittest.TestCase):
    def test_sections_split_at_titles_with_under_and_overlines(self):
        titles = [t for t, _ in sft_pairs.sections(RST)]
        self.assertEqual(titles, ["Document Title", "Section One", "Sub-section", "Short"])
        pair = sft_pairs.pair_of(*sft_pairs.sections(RST)[1], min_response=10)
        self.assertEqual(pair["prompt"], "Section One\n\nFirst paragraph of one.\n\n")
        self.assertEqual(pair["response"], "Body of one,\ncontinued.\n\n.. note:: a directive\n")
        self.assertIsNone(sft_pairs.pair_of(*sft_pairs.sections(RST)[2], min_response=10))  # no response
        self.assertIsNone(sft_pairs.pair_of(*sft_pairs.sections(RST)[3], min_response=10))  # response too short
        self.assertEqual(sft_pairs.pair_of(*sft_pairs.sections(RST)[0], min_response=10)["prompt"],
                         "Document Title\n\nIntro paragraph\nof two lines.\n\n")

    def test_prep_masks_exactly_the_prompt_tokens(self):
        out = support.scratch("sft_pairs")
        support.run([support.PYTHON, support.script("sft_pairs.py"),
                     os.path.join(support.SOURCE, "data/sample/python-docs.jsonl.xz"), "--out", out,
                     "--holdout-fraction", "0.2", "--seed", "3"])
        pairs = {}
        for split in ("train", "heldout"):
            with open(os.path.join(out, f"sft-{split}.jsonl")) as f:
                pairs[split] = [json.loads(line) for line in f]
            self.assertGreater(len(pairs[split]), 20, split)
        with open(os.path.join(out, "pretrain.jsonl")) as f:
            pretrain = "".join(json.loads(line)["text"] for line in f)
        for pair in pairs["heldout"][:50]:  # held out by file: its text is not in the pre-training documents
            self.assertNotIn(pair["response"][:300], pretrain)

        support.run([support.MOBA, "prep", os.path.join(out, "sft-train.jsonl"), "--sft", "--out",
                     os.path.join(out, "prepared"), "--val-fraction", "0.1"])
        expected = {(p["prompt"].encode(), p["response"].encode()) for p in pairs["train"]}
        seen = 0
        for split in ("train", "val"):
            with h5py.File(os.path.join(out, "prepared", f"{split}.h5"), "r") as f:
                tokens, mask, offsets = f["tokens"][:], f["loss_mask"][:], f["doc_offsets"][:]
                eos = int(f.attrs["eos_id"])
            for begin, end in zip(offsets[:-1], offsets[1:]):
                doc, doc_mask = tokens[begin:end], mask[begin:end]
                self.assertEqual(int(doc[-1]), eos)
                prompt_length = int(np.argmax(doc_mask))  # the first 1
                self.assertTrue((doc_mask[:prompt_length] == 0).all() and (doc_mask[prompt_length:] == 1).all())
                text = bytes(doc[:-1].astype(np.uint8))  # byte tokenizer: ids 0-255 are the bytes
                self.assertIn((text[:prompt_length], text[prompt_length:]), expected)
                seen += 1
        self.assertEqual(seen, len(pairs["train"]))


if __name__ == "__main__":
    unittest.main()

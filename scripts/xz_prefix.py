#!/usr/bin/env python3
"""Decompress the first whole lines of an .xz file, at least BYTES of them, to a plain file.

For machines whose moba was built without liblzma (the GPU machine has no liblzma-dev): `moba prep` reads the plain
JSON Lines this writes. Lines are kept whole, so the output is valid JSON Lines; take BYTES above the `--max-bytes`
given to prep (that counts text, which JSON escaping makes shorter than its line).

    xz_prefix.py INPUT.xz OUTPUT BYTES
"""
import lzma
import sys


def main():
    src, dst, limit = sys.argv[1], sys.argv[2], int(float(sys.argv[3]))
    written = 0
    with lzma.open(src, "rb") as fin, open(dst, "wb") as fout:
        for line in fin:
            fout.write(line)
            written += len(line)
            if written >= limit:
                break


if __name__ == "__main__":
    main()

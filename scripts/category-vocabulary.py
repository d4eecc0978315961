#!/usr/bin/env python3
"""Extracts the names and descriptions of the debtags categories from
Debian's `debtags` package (its /usr/share/debtags/vocabulary, GPL-2+ like
the package) into data/reference/categories.tsv.gz (gzipped TSV, committed).

Columns: tag (`facet::value`), facet, facet name, name (the tag's one-line
description), description (its long description, paragraphs joined into one line).

Run it again to reproduce the file byte for byte:
`python3 scripts/category-vocabulary.py` (needs `apt-get download`, i.e. a
Debian machine with its package lists; writes nothing else).
"""

import gzip
import io
import pathlib
import subprocess
import sys
import tempfile

PACKAGE = "debtags=2.1.5"
MEMBER = "./usr/share/debtags/vocabulary"
OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "reference" / "categories.tsv.gz"


def records(text):
    """RFC-822 style stanzas separated by blank lines, continuation lines
    starting with a space, ` .` meaning an empty line."""
    for stanza in text.split("\n\n"):
        fields = {}
        key = None
        for line in stanza.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key].append(line[1:])
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = [value.strip()]
        if fields:
            yield fields


def long_description(lines):
    paragraphs, current = [], []
    for line in lines:
        if line.strip() == ".":
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(" ".join(current))
    return " ".join(p for p in paragraphs if p)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        (deb,) = pathlib.Path(tmp).glob("debtags_*.deb")
        data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True,
                              stdout=subprocess.PIPE).stdout
        text = subprocess.run(["tar", "-xO", MEMBER], input=data, check=True,
                              stdout=subprocess.PIPE).stdout.decode("utf-8")
    facets, tags = {}, []
    for r in records(text):
        desc = r.get("Description", [""])
        if "Facet" in r:
            facets[r["Facet"][0]] = desc[0]
        elif "Tag" in r:
            tags.append((r["Tag"][0], desc[0], long_description(desc[1:])))
    tags.sort()
    # Plain tab-separated lines, no quoting: no field holds a tab or a newline.
    with gzip.GzipFile(OUT, "wb", mtime=0) as raw:
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            f.write("tag\tfacet\tfacet_name\tname\tdescription\n")
            for tag, name, description in tags:
                facet = tag.split("::", 1)[0]
                row = [tag, facet, facets.get(facet, ""), name, description]
                assert not any("\t" in v or "\n" in v for v in row), row
                f.write("\t".join(row) + "\n")
    print(f"{OUT}: {len(tags)} tags, {len(facets)} facets", file=sys.stderr)


if __name__ == "__main__":
    main()

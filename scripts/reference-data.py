#!/usr/bin/env python3
"""Extracts the reference data identity matching uses from the PyPI packages
that carry it, into data/reference/ (gzipped TSV, committed).

- names 0.3.0 (MIT; the files are the US Census Bureau's 1990 name
  frequency lists, public domain): first names by sex, last names, each with
  the percent of the population and the rank.
- zipcodes 3.0.0 (MIT): US ZIP codes with type, city, state, county and
  coordinates.
- nicknames 1.0.1 (Apache-2.0): first-name / nickname pairs.

Run it again to reproduce the files: `python3 scripts/reference-data.py`
(needs pip and the network to PyPI; writes nothing else).
"""

import csv
import gzip
import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGES = ["names==0.3.0", "zipcodes==3.0.0", "nicknames==1.0.1"]
OUT = pathlib.Path(__file__).resolve().parent.parent / "data" / "reference"


def write(name, header, rows):
    path = OUT / name
    with gzip.GzipFile(path, "wb", mtime=0) as raw:
        with io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t", lineterminator="\n")
            w.writerow(header)
            n = 0
            for row in rows:
                w.writerow(row)
                n += 1
    print(f"{path.relative_to(OUT.parent.parent)}: {n} rows", file=sys.stderr)


def census(text):
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4:
            yield parts[0], parts[1], parts[3]


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp), *PACKAGES],
            check=True,
        )
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(tmp / "site"),
             "zipcodes==3.0.0"],
            check=True,
        )
        (sdist,) = tmp.glob("names-*.tar.gz")
        with tarfile.open(sdist) as t:
            def member(name):
                (m,) = [m for m in t.getmembers() if m.name.endswith("names/" + name)]
                return t.extractfile(m).read().decode("ascii")

            male = member("dist.male.first")
            female = member("dist.female.first")
            last = member("dist.all.last")
        write(
            "first_names.tsv.gz",
            ["name", "sex", "percent", "rank"],
            [(n, "M", p, r) for n, p, r in census(male)] + [(n, "F", p, r) for n, p, r in census(female)],
        )
        write("last_names.tsv.gz", ["name", "percent", "rank"], census(last))

        (wheel,) = tmp.glob("nicknames-*.whl")
        with zipfile.ZipFile(wheel) as z:
            text = z.read("nicknames/names.csv").decode("utf-8")
        pairs = sorted(
            {(r["name1"], r["name2"]) for r in csv.DictReader(io.StringIO(text)) if r["relationship"] == "has_nickname"}
        )
        write("nicknames.tsv.gz", ["name", "nickname"], pairs)

        sys.path.insert(0, str(tmp / "site"))
        import zipcodes  # noqa: E402

        zips = sorted(zipcodes.list_all(), key=lambda z: z["zip_code"])
        write(
            "zips.tsv.gz",
            ["zip", "type", "active", "city", "state", "county", "lat", "long"],
            (
                (z["zip_code"], z["zip_code_type"], int(bool(z["active"])), z["city"], z["state"],
                 z["county"], z["lat"], z["long"])
                for z in zips
            ),
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Accuracy of sift's identity matching against Splink on the same data.

Reads what ``sift dbusa generate`` wrote to DIR (``dbusa.csv``,
``profiles.jsonl`` and, when present, ``enrichment.jsonl``), links the
profiles to the database with Splink 4 (``link_only``, DuckDB backend) as a
Splink user would, following Splink's documentation:

* both sides prepared with the same columns: first_name, surname, city,
  state, zip (profiles have none), email; lower-cased, a display name split
  into its first and last word, a location ``City, ST`` split at its last
  comma; profiles without a name or location first take them from their
  canned enrichment answer, as sift does;
* comparisons: first name (exact with term-frequency adjustment,
  Jaro-Winkler 0.92 / 0.88 / 0.70), surname (exact with term-frequency
  adjustment, Damerau-Levenshtein ≤ 1, Jaro-Winkler 0.92 / 0.88 / 0.70),
  city (exact, term-frequency adjusted), state (exact), email (exact);
* the prior from deterministic rules, u by random sampling (1e7 pairs,
  seeded), m by expectation maximisation over three training blocking rules;
* prediction over high-recall blocking rules, then each profile's
  best-scoring candidate, accepted when its match probability reaches the
  threshold: 0.5, and the threshold that maximises Splink's F1 on this very
  data (an oracle in Splink's favour, since it is chosen with the truth).

With ``--sift MATCHES.jsonl`` (the output of ``sift match``), sift's answers
are scored on the same profiles with the same definitions. Prints Markdown
tables and writes ``DIR/splink_compare.json`` (every figure, versions,
timings) and ``DIR/splink_model.json`` (the trained Splink model).

``--self-test`` checks the metric, threshold, parsing, enrichment and
matches-file code on hand-made data; it needs neither Splink nor DuckDB.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

NOT_IN_DB = "not_in_db"
# Corruption labels in the order the generator lists them; others found in
# the data are appended.
CORRUPTIONS = [
    "none",
    "nickname",
    "typo",
    "transposed",
    "moved_city",
    "missing_name",
    "missing_location",
    "both_missing",
    NOT_IN_DB,
]
# The columns both sides are given, in this order.
COLUMNS = ["unique_id", "first_name", "surname", "city", "state", "zip", "email"]
PROFILES = "profiles"
DATABASE = "dbusa"

log = logging.getLogger("compare")


# --------------------------------------------------------------------------
# Inputs: profiles, enrichment answers, the database, both prepared alike.
# --------------------------------------------------------------------------


def clean(value: str | None) -> str | None:
    """Lower-cased, trimmed, inner whitespace collapsed; None when empty."""
    if value is None:
        return None
    text = " ".join(str(value).split()).lower()
    return text or None


def split_name(name: str | None) -> tuple[str | None, str | None]:
    """A display name's first and last word; a single word is a first name."""
    words = (clean(name) or "").split()
    if not words:
        return None, None
    if len(words) == 1:
        return words[0], None
    return words[0], words[-1]


def split_location(location: str | None) -> tuple[str | None, str | None]:
    """``City, ST`` split at its last comma; a location without a comma is a city."""
    text = clean(location)
    if text is None:
        return None, None
    if "," not in text:
        return text, None
    city, state = text.rsplit(",", 1)
    return clean(city), clean(state)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not a JSON line ({e}); is this the right file?")
    return rows


def read_profiles(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(
            f"no {path}: generate the data first "
            "(sift dbusa generate --rows N --profiles P --outsiders O --seed S --out DIR)"
        )
    profiles = read_jsonl(path)
    for p in profiles:
        for key in ("id", "network", "handle", "corruption"):
            if key not in p:
                raise SystemExit(f"{path}: profile {p.get('id', '?')} has no {key!r}; is this profiles.jsonl?")
    return profiles


def final_status(answer: dict) -> int | None:
    """The status a client ends with: ``statuses`` scripts the answers to
    repeated requests (``[202, 200]``: queued, then found) and its last one
    repeats; an answer without a script is always 200."""
    statuses = answer.get("statuses")
    if isinstance(statuses, list):
        return statuses[-1] if statuses else 200
    if isinstance(statuses, int):
        return statuses
    return 200


def answer_key(service: str | None, username: str | None) -> tuple[str, str]:
    return ((service or "").strip().lower(), (username or "").strip().lower())


@dataclass
class Answers:
    """Canned enrichment answers, found as the enrichment stand-in finds
    them: by (service, username) without regard to case, else by an email
    of the request; the first line wins where two claim the same key."""

    by_profile: dict
    by_email: dict
    lines: int = 0

    @classmethod
    def of(cls, rows: list[dict]) -> Answers:
        answers = cls({}, {}, len(rows))
        for a in rows:
            if (a.get("username") or "").strip():
                answers.by_profile.setdefault(answer_key(a.get("service"), a.get("username")), a)
            for e in a.get("emails") or []:
                if clean(e):
                    answers.by_email.setdefault(clean(e), a)
        return answers

    def find(self, profile: dict) -> dict | None:
        found = None
        if (profile.get("handle") or "").strip():
            found = self.by_profile.get(answer_key(profile.get("network"), profile.get("handle")))
        if found is None and clean(profile.get("email")):
            found = self.by_email.get(clean(profile.get("email")))
        return found


def read_enrichment(path: Path) -> Answers:
    return Answers.of(read_jsonl(path))


def enriched_name(person: dict) -> str | None:
    """``details.name.full``, else ``fullName``, as sift reads an answer."""
    name = (person.get("details") or {}).get("name") or {}
    full = name.get("full") if isinstance(name, dict) else None
    return full if clean(full) else (person.get("fullName") if clean(person.get("fullName")) else None)


def enriched_location(person: dict) -> str | None:
    """``City, ST`` of the home location (else the first one listed)."""
    locations = [x for x in (person.get("details") or {}).get("locations") or [] if isinstance(x, dict)]
    home = next((x for x in locations if x.get("label") == "home"), locations[0] if locations else None)
    if home is None:
        return None
    city, region = clean(home.get("city")), clean(home.get("regionCode"))
    if not city or not region or len(region) != 2:
        return None
    return f"{home['city'].strip()}, {home['regionCode'].strip().upper()}"


def enrich(profiles: list[dict], answers: Answers) -> tuple[list[dict], dict]:
    """Profiles with a missing name or location filled from their answer.

    Only an answer whose final status is 200 is used, and only for what the
    profile lacks: a name the profile shows is never replaced. Returns new
    profile dicts and counts of what was filled.
    """
    out = []
    counts = {"answers": answers.lines, "looked_up": 0, "answered_200": 0, "names_filled": 0, "locations_filled": 0}
    for p in profiles:
        q = dict(p)
        if q.get("name") is None or q.get("location") is None:
            counts["looked_up"] += 1
            answer = answers.find(q)
            person = (answer or {}).get("person") or {}
            if answer is not None and final_status(answer) == 200 and isinstance(person, dict) and person:
                counts["answered_200"] += 1
                name = enriched_name(person)
                if q.get("name") is None and name:
                    q["name"] = name
                    counts["names_filled"] += 1
                location = enriched_location(person)
                if q.get("location") is None and location:
                    q["location"] = location
                    counts["locations_filled"] += 1
        out.append(q)
    return out, counts


def prepare_profile(p: dict) -> dict:
    first, last = split_name(p.get("name"))
    city, state = split_location(p.get("location"))
    return {
        "unique_id": p["id"],
        "first_name": first,
        "surname": last,
        "city": city,
        "state": state,
        "zip": None,
        "email": clean(p.get("email")),
    }


def read_database(path: Path) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"no {path}: generate the data first (sift dbusa generate ... --out DIR)")
    rows = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"dbusa_id", "first", "last", "city", "state", "zip", "email"} - set(reader.fieldnames or [])
        if missing:
            raise SystemExit(f"{path} lacks columns {sorted(missing)}; is this sift's dbusa.csv?")
        for r in reader:
            first, _ = split_name(r["first"])
            rows.append(
                {
                    "unique_id": r["dbusa_id"],
                    "first_name": first,
                    "surname": clean(r["last"]),
                    "city": clean(r["city"]),
                    "state": clean(r["state"]),
                    "zip": clean(r["zip"]),
                    "email": clean(r["email"]),
                }
            )
    return rows


# --------------------------------------------------------------------------
# Metrics: the same definitions for every system.
# --------------------------------------------------------------------------


@dataclass
class Counts:
    """Outcomes over a set of profiles."""

    profiles: int = 0
    insiders: int = 0
    outsiders: int = 0
    # Insiders given their own id.
    tp: int = 0
    # Insiders given another person's id (counted as FP and as FN).
    wrong_id: int = 0
    # Insiders given no id.
    unmatched: int = 0
    # Outsiders given any id.
    outsiders_matched: int = 0

    def add(self, truth: str | None, predicted: str | None) -> None:
        self.profiles += 1
        if truth is None:
            self.outsiders += 1
            if predicted is not None:
                self.outsiders_matched += 1
        else:
            self.insiders += 1
            if predicted is None:
                self.unmatched += 1
            elif predicted == truth:
                self.tp += 1
            else:
                self.wrong_id += 1

    def summary(self) -> dict:
        fp = self.wrong_id + self.outsiders_matched
        fn = self.wrong_id + self.unmatched
        precision = self.tp / (self.tp + fp) if self.tp + fp else None
        recall = self.tp / self.insiders if self.insiders else None
        if precision is None or recall is None:
            f1 = None
        elif precision + recall == 0:
            f1 = 0.0
        else:
            f1 = 2 * precision * recall / (precision + recall)
        return {
            **asdict(self),
            "accepted": self.tp + fp,
            "fp": fp,
            "fn": fn,
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "false_match_rate": self.outsiders_matched / self.outsiders if self.outsiders else None,
        }


def corruption_order(profiles: list[dict]) -> list[str]:
    seen = {p["corruption"] for p in profiles}
    return [c for c in CORRUPTIONS if c in seen] + sorted(seen - set(CORRUPTIONS))


def evaluate(profiles: list[dict], predicted: dict[str, str | None]) -> dict:
    """Overall and per-corruption figures of ``predicted`` (profile id → id or None)."""
    overall = Counts()
    by = {c: Counts() for c in corruption_order(profiles)}
    for p in profiles:
        guess = predicted.get(p["id"])
        overall.add(p.get("dbusa_id"), guess)
        by[p["corruption"]].add(p.get("dbusa_id"), guess)
    return {"overall": overall.summary(), "by_corruption": {c: n.summary() for c, n in by.items()}}


def probability(weight: float) -> float:
    """Splink's match probability of a match weight."""
    if weight > 1000:
        return 1.0
    return 1.0 / (1.0 + 2.0 ** (-weight))


def best_f1_threshold(profiles: list[dict], best: dict[str, tuple[str, float]]) -> dict:
    """The match-weight threshold that maximises F1 when each profile's best
    candidate is accepted at or above it (the truth is used: an oracle).

    ``best`` maps profile id → (candidate id, match weight). Among thresholds
    with the same F1 the highest wins.
    """
    insiders = sum(1 for p in profiles if p.get("dbusa_id") is not None)
    truth = {p["id"]: p.get("dbusa_id") for p in profiles}
    scored = sorted(
        ((w, truth.get(pid) is not None and truth.get(pid) == cand) for pid, (cand, w) in best.items()),
        key=lambda t: -t[0],
    )
    chosen = {"weight": math.inf, "f1": 0.0, "accepted": 0}
    tp = accepted = 0
    i = 0
    while i < len(scored):
        w = scored[i][0]
        # Every candidate with this same weight is accepted together.
        while i < len(scored) and scored[i][0] == w:
            tp += scored[i][1]
            accepted += 1
            i += 1
        precision = tp / accepted
        recall = tp / insiders if insiders else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        if f1 > chosen["f1"]:
            chosen = {"weight": w, "f1": f1, "accepted": accepted}
    chosen["probability"] = probability(chosen["weight"]) if math.isfinite(chosen["weight"]) else 1.0
    return chosen


def accept(best: dict[str, tuple[str, float]], min_weight: float) -> dict[str, str | None]:
    return {pid: cand for pid, (cand, w) in best.items() if w >= min_weight}


def read_sift_matches(path: Path, profiles: list[dict]) -> tuple[dict[str, str | None], dict]:
    """sift's answers by profile id, and how well the file covers the profiles."""
    if not path.is_file():
        raise SystemExit(f"no {path}: write it with sift match --input DIR/profiles.jsonl --output {path}")
    rows = read_jsonl(path)
    known = {p["id"] for p in profiles}
    predicted: dict[str, str | None] = {}
    duplicates = unknown = 0
    for r in rows:
        if "id" not in r or "dbusa_id" not in r:
            raise SystemExit(f"{path}: a line without 'id' and 'dbusa_id'; is this sift match's output?")
        if r["id"] not in known:
            unknown += 1
            continue
        if r["id"] in predicted:
            duplicates += 1
        predicted[r["id"]] = r["dbusa_id"] or None
    coverage = {
        "lines": len(rows),
        "profiles_answered": len(predicted),
        "profiles_missing": len(known - predicted.keys()),
        "unknown_ids": unknown,
        "duplicate_ids": duplicates,
        "same_order_as_input": [r.get("id") for r in rows] == [p["id"] for p in profiles],
    }
    if not predicted:
        raise SystemExit(f"{path} answers none of the {len(known)} profiles; was it made from this DIR?")
    if coverage["profiles_missing"] or unknown or duplicates:
        log.warning(
            "%s: %d profiles without an answer (scored as unmatched), %d unknown ids, %d duplicates",
            path,
            coverage["profiles_missing"],
            unknown,
            duplicates,
        )
    return predicted, coverage


# --------------------------------------------------------------------------
# Splink.
# --------------------------------------------------------------------------


def splink_settings():
    """The model: comparisons and blocking rules, from Splink's documented library."""
    import splink.comparison_level_library as cll
    import splink.comparison_library as cl
    from splink import SettingsCreator, block_on

    surname = cl.CustomComparison(
        output_column_name="surname",
        comparison_description="surname: exact (tf) / Damerau-Levenshtein <= 1 / Jaro-Winkler",
        comparison_levels=[
            cll.NullLevel("surname"),
            cll.ExactMatchLevel("surname", term_frequency_adjustments=True),
            cll.DamerauLevenshteinLevel("surname", 1),
            cll.JaroWinklerLevel("surname", 0.92),
            cll.JaroWinklerLevel("surname", 0.88),
            cll.JaroWinklerLevel("surname", 0.7),
            cll.ElseLevel(),
        ],
    )
    comparisons = [
        # Null, exact (tf), Jaro-Winkler 0.92, 0.88, 0.70, else.
        cl.NameComparison("first_name").configure(term_frequency_adjustments=True),
        surname,
        cl.ExactMatch("city").configure(term_frequency_adjustments=True),
        cl.ExactMatch("state"),
        cl.ExactMatch("email"),
    ]
    blocking = [
        block_on("surname"),
        block_on("first_name", "state"),
        block_on("city", "state"),
        block_on("email"),
        block_on("substr(surname, 1, 3)", "state"),
    ]
    return SettingsCreator(
        link_type="link_only",
        unique_id_column_name="unique_id",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=blocking,
        retain_matching_columns=False,
        retain_intermediate_calculation_columns=False,
    )


def run_splink(args, database: list[dict], prepared: list[dict], profiles: list[dict]) -> dict:
    import duckdb
    import pandas as pd
    import splink
    from splink import DuckDBAPI, Linker, block_on

    con = duckdb.connect()
    con.execute(f"SET threads = {int(args.threads)}")
    db_api = DuckDBAPI(connection=con)
    df_db = pd.DataFrame(database, columns=COLUMNS)
    df_profiles = pd.DataFrame(prepared, columns=COLUMNS)
    linker = Linker(
        [df_db, df_profiles],
        splink_settings(),
        db_api=db_api,
        input_table_aliases=[DATABASE, PROFILES],
        set_up_basic_logging=args.verbose,
    )

    timings = {}
    start = time.perf_counter()
    linker.training.estimate_probability_two_random_records_match(
        [block_on("first_name", "surname", "state"), block_on("email")], recall=args.recall
    )
    timings["prior_s"] = time.perf_counter() - start
    mark = time.perf_counter()
    linker.training.estimate_u_using_random_sampling(max_pairs=args.max_pairs, seed=args.seed)
    timings["u_s"] = time.perf_counter() - mark
    mark = time.perf_counter()
    # Each comparison is estimated by at least one rule that does not block on it.
    for rule in (block_on("surname"), block_on("city", "state"), block_on("email")):
        linker.training.estimate_parameters_using_expectation_maximisation(rule)
    timings["em_s"] = time.perf_counter() - mark
    timings["training_s"] = time.perf_counter() - start
    log.info("training took %.1f s", timings["training_s"])

    mark = time.perf_counter()
    predictions = linker.inference.predict()
    table = predictions.physical_name
    # Either side may be on the left of a pair: put the profile first.
    pairs = f"""
        select
            case when source_dataset_l = '{PROFILES}' then unique_id_l else unique_id_r end as profile_id,
            case when source_dataset_l = '{PROFILES}' then unique_id_r else unique_id_l end as dbusa_id,
            match_weight, match_probability
        from {table}
    """
    best_rows = con.execute(
        f"""
        select profile_id, dbusa_id, match_weight, match_probability from (
            select *, row_number() over (
                partition by profile_id order by match_weight desc, dbusa_id
            ) as rank
            from ({pairs})
        ) where rank = 1
        """
    ).fetchall()
    timings["prediction_s"] = time.perf_counter() - mark
    log.info("prediction took %.1f s", timings["prediction_s"])

    scored_pairs = con.execute(f"select count(*) from {table}").fetchall()[0][0]
    truth = pd.DataFrame(
        [(p["id"], p["dbusa_id"]) for p in profiles if p.get("dbusa_id") is not None],
        columns=["profile_id", "truth"],
    )
    con.register("truth_pairs", truth)
    blocked_truth = con.execute(
        f"select count(distinct p.profile_id) from ({pairs}) p "
        "join truth_pairs t on p.profile_id = t.profile_id and p.dbusa_id = t.truth"
    ).fetchall()[0][0]

    model_path = Path(args.dir) / "splink_model.json"
    model = linker.misc.save_model_to_json(str(model_path), overwrite=True)

    best = {pid: (cand, float(w)) for pid, cand, w, _ in best_rows}
    best_probability = {pid: float(p) for pid, _, _, p in best_rows}
    at_half = {pid: cand for pid, (cand, _) in best.items() if best_probability[pid] >= 0.5}
    oracle = best_f1_threshold(profiles, best)
    at_oracle = accept(best, oracle["weight"])
    return {
        "versions": {"splink": splink.__version__, "duckdb": duckdb.__version__, "pandas": pd.__version__},
        "timings": timings,
        "threads": int(args.threads),
        "probability_two_random_records_match": model.get("probability_two_random_records_match"),
        "scored_pairs": int(scored_pairs),
        "profiles_with_a_candidate": len(best),
        "insiders_whose_true_record_was_scored": int(blocked_truth),
        "model_file": str(model_path),
        "threshold_0_5": {"match_probability": 0.5, **evaluate(profiles, at_half)},
        "threshold_best_f1": {
            "oracle": "chosen with the truth labels to maximise Splink's F1 on this data: favours Splink",
            "match_weight": oracle["weight"],
            "match_probability": oracle["probability"],
            **evaluate(profiles, at_oracle),
        },
    }


# --------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------


def fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def prf(s: dict) -> str:
    return f"{fmt(s['precision'])} / {fmt(s['recall'])} / {fmt(s['f1'])}"


def markdown(report: dict) -> str:
    data = report["data"]
    sp = report["splink"]
    oracle = sp["threshold_best_f1"]
    # (name, short name, what it accepts, figures)
    systems = [
        ("Splink", "Splink, p ≥ 0.5", "p ≥ 0.5", sp["threshold_0_5"]),
        (
            "Splink, oracle threshold¹",
            "Splink, oracle¹",
            f"p ≥ {oracle['match_probability']:.3g} (w ≥ {oracle['match_weight']:.2f})",
            oracle,
        ),
    ]
    if report.get("sift"):
        systems.append(("sift", "sift", "its own", report["sift"]))
    lines = [
        (
            f"Profiles: {data['profiles']} ({data['insiders']} in the database, {data['outsiders']} not); "
            f"database: {data['database_rows']} rows; enrichment: {data['enrichment']['file'] or 'none'}."
        ),
        "",
        "| system | accepts | accepted | TP | FP | FN | precision | recall | F1 | false-match rate (not_in_db) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, _, rule, figures in systems:
        o = figures["overall"]
        lines.append(
            f"| {name} | {rule} | {o['accepted']} | {o['tp']} | {o['fp']} | {o['fn']} | "
            f"{fmt(o['precision'])} | {fmt(o['recall'])} | {fmt(o['f1'])} | "
            f"{fmt(o['false_match_rate'])} ({o['outsiders_matched']}/{o['outsiders']}) |"
        )
    lines += [
        "",
        "Per corruption type: precision / recall / F1 (not_in_db: false-match rate, outsiders given an id).",
        "",
        "| corruption | profiles | " + " | ".join(short for _, short, _, _ in systems) + " |",
        "| --- | ---: | " + " | ".join("---" for _ in systems) + " |",
    ]
    for c, counts in systems[0][3]["by_corruption"].items():
        cells = []
        for _, _, _, figures in systems:
            s = figures["by_corruption"][c]
            if s["insiders"] == 0:
                cells.append(f"{fmt(s['false_match_rate'])} ({s['outsiders_matched']}/{s['outsiders']})")
            else:
                cells.append(prf(s))
        lines.append(f"| {c} | {counts['profiles']} | " + " | ".join(cells) + " |")
    t = sp["timings"]
    lines += [
        "",
        (
            "¹ The threshold that maximises Splink's F1, chosen with the truth labels of this same data: "
            "an oracle in Splink's favour that no deployment has."
        ),
        "",
        (
            f"Splink {sp['versions']['splink']}, DuckDB {sp['versions']['duckdb']}, {sp['threads']} threads: "
            f"training {t['training_s']:.1f} s (prior {t['prior_s']:.1f}, u {t['u_s']:.1f}, EM {t['em_s']:.1f}), "
            f"prediction {t['prediction_s']:.1f} s over {sp['scored_pairs']} pairs; "
            f"{sp['insiders_whose_true_record_was_scored']}/{data['insiders']} insiders had their true record "
            f"among the blocked pairs (the recall ceiling)."
        ),
    ]
    return "\n".join(lines)


def run(args) -> int:
    level = logging.INFO if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)
    root = Path(args.dir)
    started = time.perf_counter()
    profiles = read_profiles(root / "profiles.jsonl")
    enrichment_path = root / "enrichment.jsonl"
    if enrichment_path.is_file():
        enriched, enrichment = enrich(profiles, read_enrichment(enrichment_path))
        enrichment["file"] = str(enrichment_path)
    else:
        enriched, enrichment = profiles, {"file": None}
        log.info("no %s: profiles are used as they are", enrichment_path)
    prepared = [prepare_profile(p) for p in enriched]
    database = read_database(root / "dbusa.csv")
    log.info("%d profiles, %d database rows", len(profiles), len(database))

    report = {
        "data": {
            "dir": str(root.resolve()),
            "profiles": len(profiles),
            "insiders": sum(1 for p in profiles if p.get("dbusa_id") is not None),
            "outsiders": sum(1 for p in profiles if p.get("dbusa_id") is None),
            "database_rows": len(database),
            "enrichment": enrichment,
        },
        "definitions": {
            "tp": "an insider given its own id",
            "fp": "an insider given another id, or an outsider (not_in_db) given any id",
            "fn": "an insider given another id or no id",
            "precision": "TP / (TP + FP)",
            "recall": "TP / insiders",
            "f1": "harmonic mean of precision and recall",
            "false_match_rate": "outsiders given any id / outsiders",
            "best_candidate": "each profile keeps its highest-weight candidate (ties: lowest id)",
        },
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()},
    }
    report["splink"] = run_splink(args, database, prepared, profiles)
    if args.sift:
        predicted, coverage = read_sift_matches(Path(args.sift), profiles)
        report["sift"] = {"file": str(Path(args.sift).resolve()), "coverage": coverage, **evaluate(profiles, predicted)}
    report["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["total_s"] = time.perf_counter() - started

    out = Path(args.out) if args.out else root / "splink_compare.json"
    out.write_text(json.dumps(report, indent=2, default=float) + "\n", encoding="utf-8")
    print(markdown(report))
    print(f"\nWrote {out}.", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------
# Self-test of everything but Splink itself.
# --------------------------------------------------------------------------


def self_test() -> int:
    failures = []

    def check(what: str, got, want) -> None:
        ok = abs(got - want) < 1e-9 if isinstance(want, float) and got is not None else got == want
        if not ok:
            failures.append(f"{what}: got {got!r}, want {want!r}")

    # Parsing.
    check("split_name", split_name("  Mary  Ann   Smith "), ("mary", "smith"))
    check("split_name one word", split_name("Cher"), ("cher", None))
    check("split_name none", split_name(None), (None, None))
    check("split_location", split_location("St. Louis, MO"), ("st. louis", "mo"))
    check("split_location comma in city", split_location("Washington, D.C., DC"), ("washington, d.c.", "dc"))
    check("split_location no comma", split_location("Paris"), ("paris", None))
    check("clean empty", clean("   "), None)

    # Enrichment: only the missing parts, only on a final 200.
    profiles = [
        {"id": "a", "network": "twitter", "handle": "Ann1", "name": None, "location": None},
        {"id": "b", "network": "twitter", "handle": "bob", "name": "Bob Ray", "location": None},
        {"id": "c", "network": "twitter", "handle": "cy", "name": None, "location": "Reno, NV"},
        {"id": "d", "network": "tiktok", "handle": "dee", "name": None, "location": None},
        {"id": "e", "network": "twitter", "handle": "eve", "name": "Eve Ho", "location": "Ely, MN"},
    ]
    person = {"fullName": "Ann Lee", "details": {"locations": [{"city": "Austin", "regionCode": "TX"}]}}
    bob = {"fullName": "Robert Ray", "details": {"locations": [{"city": "Troy", "regionCode": "NY"}]}}
    answers = Answers.of(
        [
            {"service": "Twitter", "username": "ann1", "statuses": [429, 202, 200], "person": person},
            {"service": "twitter", "username": "bob", "person": bob},
            {"service": "twitter", "username": "cy", "statuses": [200, 404], "person": person},
            {"service": "tiktok", "username": "dee", "person": None},
            {"service": "twitter", "username": "eve", "statuses": [200], "person": person},
            {"service": "twitter", "username": "bob", "statuses": [404], "person": person},
        ]
    )
    enriched, counts = enrich(profiles, answers)
    check("enrich fills both", (enriched[0]["name"], enriched[0]["location"]), ("Ann Lee", "Austin, TX"))
    check("enrich keeps a shown name", (enriched[1]["name"], enriched[1]["location"]), ("Bob Ray", "Troy, NY"))
    check("enrich ignores a final 404", (enriched[2]["name"], enriched[2]["location"]), (None, "Reno, NV"))
    check("enrich ignores an empty person", enriched[3]["name"], None)
    check("enrich leaves complete profiles", enriched[4]["location"], "Ely, MN")
    check(
        "enrich counts",
        (counts["looked_up"], counts["answered_200"], counts["names_filled"], counts["locations_filled"]),
        (4, 2, 1, 2),
    )
    check("enrich copies", profiles[0]["name"], None)
    # By email when the handle is unknown; the home location before others.
    home = {
        "details": {
            "name": {"full": "Fay Wu"},
            "locations": [{"city": "Waco", "regionCode": "TX"}, {"label": "home", "city": "Omaha", "regionCode": "ne"}],
        }
    }
    by_email = Answers.of([{"service": "twitter", "username": "other", "emails": ["Fay@X.com"], "person": home}])
    enriched, _ = enrich([{"id": "f", "network": "tiktok", "handle": "fay", "email": "fay@x.com"}], by_email)
    check("enrich by email", (enriched[0]["name"], enriched[0]["location"]), ("Fay Wu", "Omaha, NE"))
    enriched, _ = enrich([{"id": "g", "network": "tiktok", "handle": "gus", "email": None}], by_email)
    check("enrich without a key", enriched[0].get("name"), None)
    check(
        "prepare_profile",
        prepare_profile({"id": "x", "name": "Jo Ann Doe", "location": "Troy, NY", "email": " J@X.COM "}),
        {
            "unique_id": "x",
            "first_name": "jo",
            "surname": "doe",
            "city": "troy",
            "state": "ny",
            "zip": None,
            "email": "j@x.com",
        },
    )

    # Metrics on hand-counted data: 6 insiders, 2 outsiders.
    truth = [
        ("p1", "D1", "none"),
        ("p2", "D2", "none"),
        ("p3", "D3", "typo"),
        ("p4", "D4", "typo"),
        ("p5", "D5", "nickname"),
        ("p6", "D6", "nickname"),
        ("o1", None, NOT_IN_DB),
        ("o2", None, NOT_IN_DB),
    ]
    profiles = [{"id": i, "dbusa_id": d, "corruption": c} for i, d, c in truth]
    predicted = {"p1": "D1", "p2": "D2", "p3": "D9", "p4": None, "p5": "D5", "o1": "D7"}
    r = evaluate(profiles, predicted)
    o = r["overall"]
    check("tp", o["tp"], 3)
    check("fp", o["fp"], 2)  # p3 wrong id, o1
    check("fn", o["fn"], 3)  # p3 wrong id, p4 and p6 unmatched
    check("precision", o["precision"], 3 / 5)
    check("recall", o["recall"], 3 / 6)
    check("f1", o["f1"], 2 * 0.6 * 0.5 / 1.1)
    check("false-match rate", o["false_match_rate"], 0.5)
    check("typo recall", r["by_corruption"]["typo"]["recall"], 0.0)
    check("typo precision", r["by_corruption"]["typo"]["precision"], 0.0)
    check("typo f1", r["by_corruption"]["typo"]["f1"], 0.0)
    check("none f1", r["by_corruption"]["none"]["f1"], 1.0)
    check("not_in_db recall", r["by_corruption"][NOT_IN_DB]["recall"], None)
    check("not_in_db fmr", r["by_corruption"][NOT_IN_DB]["false_match_rate"], 0.5)
    check("corruption order", list(r["by_corruption"]), ["none", "nickname", "typo", NOT_IN_DB])

    # The oracle threshold: accepting down to weight 2 gives 3 TP of 4 accepted.
    best = {
        "p1": ("D1", 9.0),
        "p2": ("D2", 5.0),
        "o1": ("D7", 4.0),
        "p5": ("D5", 2.0),
        "p3": ("D9", -1.0),
        "o2": ("D8", -3.0),
    }
    chosen = best_f1_threshold(profiles, best)
    check("oracle weight", chosen["weight"], 2.0)
    check("oracle f1", chosen["f1"], 2 * 0.75 * 0.5 / 1.25)
    check("oracle probability", chosen["probability"], 0.8)
    check("oracle applied", evaluate(profiles, accept(best, chosen["weight"]))["overall"]["f1"], chosen["f1"])
    check("probability of 0", probability(0.0), 0.5)
    # Ties are accepted together.
    tied = best_f1_threshold(profiles, {"p1": ("D1", 3.0), "o1": ("D7", 3.0), "p2": ("D2", 1.0)})
    check("oracle ties", tied["weight"], 1.0)

    # sift's matches file: a perfect one, and one with deliberate errors.
    with tempfile.TemporaryDirectory() as tmp:
        perfect = Path(tmp) / "perfect.jsonl"
        perfect.write_text(
            "".join(json.dumps({"id": p["id"], "dbusa_id": p["dbusa_id"], "score": 1.0}) + "\n" for p in profiles)
        )
        got, coverage = read_sift_matches(perfect, profiles)
        o = evaluate(profiles, got)["overall"]
        check("perfect f1", o["f1"], 1.0)
        check("perfect fmr", o["false_match_rate"], 0.0)
        check("perfect order", coverage["same_order_as_input"], True)
        flawed = Path(tmp) / "flawed.jsonl"
        lines = [
            {"id": "p1", "dbusa_id": "D1"},
            {"id": "p2", "dbusa_id": "D3"},
            {"id": "p3", "dbusa_id": None},
            {"id": "o1", "dbusa_id": "D1"},
            {"id": "zz", "dbusa_id": "D1"},
        ]
        flawed.write_text("".join(json.dumps(x) + "\n" for x in lines))
        logging.disable(logging.WARNING)
        got, coverage = read_sift_matches(flawed, profiles)
        logging.disable(logging.NOTSET)
        o = evaluate(profiles, got)["overall"]
        check("flawed tp/fp/fn", (o["tp"], o["fp"], o["fn"]), (1, 2, 5))
        check("flawed coverage", (coverage["profiles_missing"], coverage["unknown_ids"]), (4, 1))

    # The tables: one row per system, one per corruption type.
    figures = evaluate(profiles, predicted)
    report = {
        "data": {"profiles": 8, "insiders": 6, "outsiders": 2, "database_rows": 9, "enrichment": {"file": None}},
        "splink": {
            "threshold_0_5": figures,
            "threshold_best_f1": {"match_probability": 0.8, "match_weight": 2.0, **figures},
            "timings": {"training_s": 1.0, "prior_s": 0.1, "u_s": 0.4, "em_s": 0.5, "prediction_s": 0.2},
            "versions": {"splink": "x", "duckdb": "y"},
            "threads": 2,
            "scored_pairs": 10,
            "insiders_whose_true_record_was_scored": 5,
        },
        "sift": figures,
    }
    table = markdown(report).splitlines()

    def row(prefix: str) -> str:
        return next((x for x in table if x.startswith(prefix)), "")

    check("overall sift row", row("| sift |").split(" | ")[2:4], ["5", "3"])
    check("per-corruption typo row", row("| typo |").count("0.000 / 0.000 / 0.000"), 3)
    check("per-corruption outsider row", row("| not_in_db |").count("0.500 (1/2)"), 3)

    if failures:
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
        print(f"self-test: {len(failures)} failed", file=sys.stderr)
        return 1
    print("self-test: all checks passed", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", nargs="?", help="the folder sift dbusa generate wrote")
    parser.add_argument("--sift", help="sift match's output on DIR/profiles.jsonl, scored alongside")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DuckDB threads (default: all cores)")
    parser.add_argument("--seed", type=int, default=42, help="seed of u's random sampling")
    parser.add_argument(
        "--max-pairs", type=float, default=1e7, help="random pairs for u (default 1e7, as Splink advises over 1e6)"
    )
    parser.add_argument(
        "--recall",
        type=float,
        default=0.6,
        help="assumed recall of the deterministic rules that estimate the prior (default 0.6)",
    )
    parser.add_argument("--out", help="the JSON report (default DIR/splink_compare.json)")
    parser.add_argument("--verbose", action="store_true", help="Splink's own progress log")
    parser.add_argument("--self-test", action="store_true", help="check the metric code and exit")
    args = parser.parse_args()
    if args.self_test:
        return self_test()
    if not args.dir:
        parser.error("DIR is required (the folder sift dbusa generate wrote)")
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

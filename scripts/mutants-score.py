"""Scores the runs of scripts/mutants per module: caught / viable, where viable mutants are
those that built (caught, missed or timed out; a timeout counts as caught, cargo-mutants'
own convention). For each source file the latest run that examined it counts. Survivors must
be explained in tests/mutants-survivors.md, one line "- `<mutant>` — <reason>", the mutant
named as cargo-mutants names it without its line and column (they move with every edit).
Exit status 1 if a module is under 90% or has an unexplained survivor."""

import json
import pathlib
import re
import sys

TARGET = 0.90


def key(name):
    """`src/x.rs:31:9: replace f -> T with 0` without the position."""
    return re.sub(r"^([^:]+):\d+:\d+:", r"\1:", name)


explained = {}
notes = pathlib.Path("tests/mutants-survivors.md")
if notes.exists():
    for line in notes.read_text().splitlines():
        if line.startswith("- `") and "` — " in line:
            name, reason = line[3:].split("` — ", 1)
            explained[key(name)] = reason

# file -> list of (name, summary) from the latest run that examined the file.
by_file = {}
runs = sorted(pathlib.Path("target/mutants").glob("*/mutants.out/outcomes.json"),
              key=lambda p: p.stat().st_mtime)
for run in runs:
    data = json.loads(run.read_text())
    seen = {}
    for outcome in data["outcomes"]:
        scenario = outcome["scenario"]
        if not isinstance(scenario, dict):
            continue
        mutant = scenario["Mutant"]
        seen.setdefault(mutant["file"], []).append((mutant["name"], outcome["summary"]))
    if run.parent.parent.name.endswith("-recheck"):
        # A re-run of some mutants only (scripts/mutants --recheck): its outcomes replace
        # those of the same mutants, matched by name without position and, where a file has
        # several alike (`replace + with -` in one function), by their order in the file.
        for f, results in seen.items():
            new = {}
            for name, summary in results:
                new.setdefault(key(name), []).append(summary)
            merged = []
            for name, summary in by_file.get(f, []):
                again = new.get(key(name))
                merged.append((name, again.pop(0) if again else summary))
            by_file[f] = merged
    else:
        by_file.update(seen)

if sys.argv[1] == "--survivors":
    # For scripts/mutants --recheck: a regex matching every unexplained survivor.
    names = sorted({key(name).split(": ", 1)[1]
                    for f, results in by_file.items() for name, summary in results
                    if summary == "MissedMutant" and key(name) not in explained})
    meta = set("\\.+*?()|[]{}^$")
    print("|".join("".join("\\" + c if c in meta else c for c in n) for n in names))
    sys.exit(0)

failed = False
print(f"{'module':<18} {'viable':>6} {'caught':>6} {'missed':>6} {'explained':>9} {'unviable':>8} {'score':>6}")
for module in sys.argv[1:]:
    files = [f for f in by_file if f == module or f.startswith(module.rstrip("/") + "/")]
    if not files:
        print(f"{module:<18} (not run yet)")
        failed = True
        continue
    caught = missed = unviable = n_explained = 0
    unexplained = []
    for f in files:
        for name, summary in by_file[f]:
            if summary in ("CaughtMutant", "Timeout"):
                caught += 1
            elif summary == "MissedMutant":
                missed += 1
                if key(name) in explained:
                    n_explained += 1
                else:
                    unexplained.append(name)
            else:
                unviable += 1
    viable = caught + missed
    score = caught / viable if viable else 1.0
    note = ""
    if score < TARGET:
        note = "  <-- below 90%"
    if unexplained:
        note += f"  <-- {len(unexplained)} unexplained"
    print(f"{module:<18} {viable:>6} {caught:>6} {missed:>6} {n_explained:>9} {unviable:>8} {score:>6.0%}{note}")
    for name in unexplained:
        print(f"    missed: {name}")
    failed |= bool(note)
sys.exit(1 if failed else 0)

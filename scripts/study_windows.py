"""The MiniLM study's READ with streaming windows of whole batches (scripts/results/minilm.jsonl) against the
same study with 512-example windows (scripts/results/minilm-512-windows.jsonl): per task, the learning rate with
the best mean validation metric, its test mean ± std over seeds, peak memory and seconds per epoch.

    python scripts/study_windows.py
"""
import json, sys
import numpy as np
def load(path):
    rows = [json.loads(l) for l in open(path)]
    return [r for r in rows if r["method"] == "read"]
def best(rows, task):
    by = {}
    for r in rows:
        if r["task"] == task: by.setdefault(r["config"]["lr"], []).append(r)
    if not by: return None
    lr, rs = max(by.items(), key=lambda kv: np.mean([r["validation"] for r in kv[1]]))
    return lr, rs
root = sys.argv[1] if len(sys.argv) > 1 else "scripts/results"  
new, old = load(f"{root}/minilm.jsonl"), load(f"{root}/minilm-512-windows.jsonl")
print("| task | windows | lr | seeds | validation | test | peak memory (MiB) | s / epoch |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for task in ("sst2", "cola", "stsb", "mrpc", "rte"):
    for name, rows in (("512 examples", old), ("one batch or more (new)", new)):
        b = best(rows, task)
        if not b: continue
        lr, rs = b
        v = [r["validation"] for r in rs]; t = [r["test"] for r in rs]
        mem = np.mean([r["peak_memory_bytes"] for r in rs]) / 2**20
        sec = np.mean([np.mean(r["epoch_seconds"]) for r in rs])
        sd = f" ± {np.std(t):.2f}" if len(t) > 1 else ""
        print(f"| {task} | {name} | {lr:g} | {len(rs)} | {np.mean(v):.2f} | {np.mean(t):.2f}{sd} | {mem:,.0f} | {sec:.1f} |")

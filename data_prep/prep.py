"""`prepare(...)`: raw text -> tokenized MDS shards, in parallel, resumable, with a manifest.

Output directory:

    OUT/manifest.json      written last: its presence means the dataset is complete
    OUT/errors.jsonl       every bad input (file, line, reason, fix), when there was any
    OUT/train/index.json   streaming index over OUT/train/<unit>/shard.*.mds.zstd
    OUT/val/index.json     (only when documents went to the validation split)
    OUT/.prep/             work state while running (unit markers, temp dirs); removed at the end

A rerun with the same inputs and settings resumes (finished units are skipped) or, when the
manifest is there, does nothing. Different settings or inputs in the same OUT are refused unless
`overwrite=True`.

A job array splits the work: `task=i, tasks=n` runs only the units task i of n owns (a fixed share,
balanced by size, that depends only on the plan) and writes no manifest; `merge=True` then checks
that every unit is finished (naming the tasks to rerun otherwise) and writes the index and the
manifest. The result is byte for byte what one `prepare` of the same inputs writes.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

from megamom.fsutil import check_out

from .errors import BadInput, PrepError, StrictStop
from .inputs import InputFile, Unit, discover, plan_units
from .worker import SPLITS, PrepSettings, init_worker, process_unit, token_dtype, write_json_atomic

MANIFEST = "manifest.json"
FORMAT = "megamom-prep"
VERSION = 1
LAYOUTS = ("concat", "packed")
TXT_MODES = ("file", "line", "paragraph")


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def check_settings(st: PrepSettings) -> None:
    if st.layout not in LAYOUTS:
        raise PrepError(f"layout {st.layout!r} is not one of {list(LAYOUTS)} (concat = cut the token stream "
                        "into samples; packed = keep documents whole, with their lengths)")
    if st.txt_mode not in TXT_MODES:
        raise PrepError(f"txt mode {st.txt_mode!r} is not one of {list(TXT_MODES)}")
    if st.invalid_utf8 not in ("replace", "reject"):
        raise PrepError(f"invalid-utf8 {st.invalid_utf8!r} must be 'replace' or 'reject'")
    if st.seq_len < 1:
        raise PrepError(f"seq_len={st.seq_len} must be >= 1")
    if not 0.0 <= st.val_fraction < 1.0:
        raise PrepError(f"val_fraction={st.val_fraction} must be in [0, 1)")
    if st.compression not in (None, "zstd") and not str(st.compression).startswith("zstd:"):
        raise PrepError(f"compression {st.compression!r}: use zstd, zstd:LEVEL or none")
    for key in ("unit_bytes", "shard_bytes", "max_line_bytes", "chunk_chars", "pack_bins"):
        if getattr(st, key) < 1:
            raise PrepError(f"{key}={getattr(st, key)} must be >= 1")
    if st.shard_bytes >= 1 << 32:
        raise PrepError(f"shard_bytes={st.shard_bytes} must be below 4 GiB (MDS offsets are 32-bit)")


# How inputs become work units (2: small files grouped): part of the fingerprint, so that an
# unfinished run of a megamom that planned units otherwise is never resumed with this plan's markers.
UNIT_PLAN = 2


def _fingerprint(st: PrepSettings, tok, files: list[InputFile]) -> str:
    blob = json.dumps({"settings": st.to_dict(), "tokenizer": tok.hash, "unit_plan": UNIT_PLAN,
                       "inputs": [f.describe() for f in files]}, sort_keys=True)
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return (", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5])
            or "the input files, or an earlier megamom that cut them into work units otherwise")


def check_task(task: Optional[int], tasks: Optional[int], merge: bool, overwrite: bool) -> None:
    if tasks is not None and tasks < 1:
        raise PrepError(f"--tasks {tasks} must be >= 1 (the number of array tasks)")
    if task is not None:
        if tasks is None:
            raise PrepError(f"--task {task} needs --tasks N, the array's size (the same in every task and the merge)")
        if not 0 <= task < tasks:
            raise PrepError(f"--task {task} is not in [0, {tasks}): the array of --tasks {tasks} is "
                            f"--array=0-{tasks - 1}")
        if merge:
            raise PrepError("--task and --merge are two steps: the array tasks, then one merge job")
    if overwrite and (task is not None or merge):
        raise PrepError("--overwrite cannot be used in a job array (a task would delete what the others wrote): "
                        "remove the output directory first, or choose another --out")


def assign_tasks(units: list[Unit], n: int) -> dict[str, int]:
    """uid -> the array task that owns it: largest units first, each to the least loaded task."""
    loads, owner = [0] * n, {}
    for u in sorted(units, key=lambda u: (-u.size, u.uid)):
        k = min(range(n), key=lambda t: (loads[t], t))
        owner[u.uid] = k
        loads[k] += u.size
    return owner


def prepare(inputs: list[str], out: str | Path, tokenizer, settings: Optional[PrepSettings] = None, *,
            workers: Optional[int] = None, strict: bool = False, overwrite: bool = False,
            progress: bool = True, log=None, task: Optional[int] = None, tasks: Optional[int] = None,
            merge: bool = False) -> Optional[dict]:
    """Tokenize `inputs` into `out`; returns the manifest (None from an array task, which writes
    none). `tokenizer` is a path or a Tokenizer."""
    from megamom.tokenizer import load_tokenizer

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    st = settings or PrepSettings()
    check_settings(st)
    check_task(task, tasks, merge, overwrite)
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
    if st.add_eos and tok.eos_id is None:
        raise PrepError(f"tokenizer {tok.path!r} has no EOS token; pass --no-eos or use a tokenizer with one")
    if st.add_bos and tok.bos_id is None:
        raise PrepError(f"tokenizer {tok.path!r} has no BOS token; drop --bos or use a tokenizer with one")
    files, skipped = discover(list(inputs))
    for s in skipped[:10]:
        log(f"prep: skipping {s} (unsupported file type)")
    if len(skipped) > 10:
        log(f"prep: ... and {len(skipped) - 10} more unsupported files skipped")
    # a regular file in the way, or an unwritable place, is an error (non-empty directories are judged
    # below: resume, overwrite); prep writes into `out` itself, not into a sibling renamed into place
    out = check_out(out, overwrite, error=PrepError, require_empty=False, staged=False)
    fp = _fingerprint(st, tok, files)
    job = {"fingerprint": fp, "settings": st.to_dict(), "tokenizer": tok.hash}

    manifest_path = out / MANIFEST
    state = out / ".prep"
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old.get("fingerprint") == fp and not overwrite:
            log(f"prep: {out} is complete already (same inputs and settings); nothing to do")
            return old
        if not overwrite:
            raise PrepError(f"{out} holds a dataset prepared with other inputs or settings "
                            f"({_diff(old.get('settings', {}), st.to_dict())}); pass --overwrite to "
                            "replace it, or choose another --out")
    elif (state / "job.json").is_file():
        old = json.loads((state / "job.json").read_text())
        if old.get("fingerprint") != fp and not overwrite:
            raise PrepError(f"{out} holds an unfinished run with other inputs or settings "
                            f"({_diff(old.get('settings', {}), st.to_dict())}); rerun it with the same "
                            "arguments to finish it, or pass --overwrite to start over")
    elif out.exists() and any(not _ours(c.name) for c in out.iterdir()):
        raise PrepError(f"{out} exists, is not empty and is no prep output; choose another --out "
                        "(it is never deleted)")
    if overwrite and out.exists() and (manifest_path.is_file() or state.is_dir()):
        old_fp = (json.loads(manifest_path.read_text()).get("fingerprint") if manifest_path.is_file()
                  else json.loads((state / "job.json").read_text()).get("fingerprint")
                  if (state / "job.json").is_file() else None)
        if old_fp != fp:
            log(f"prep: --overwrite: removing the previous output in {out}")
            for child in out.iterdir():
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(state / "job.json", job)

    units = plan_units(files, st.txt_mode, st.unit_bytes)
    done_dir = state / "units"
    todo = [u for u in units if not (done_dir / f"{u.uid}.json").is_file()]
    if merge and todo:
        raise PrepError(_unfinished(todo, units, tasks))
    mine = todo
    if task is not None:
        owner = assign_tasks(units, tasks)
        mine = [u for u in todo if owner[u.uid] == task]
        log(f"prep: task {task} of {tasks}: {sum(owner[u.uid] == task for u in units)} of {len(units)} "
            f"units are this task's, {len(mine)} to do")
    elif len(todo) < len(units):
        log(f"prep: resuming: {len(units) - len(todo)} of {len(units)} units finished already")
    nproc = max(1, min(workers or default_workers(), len(mine) or 1))
    total_bytes = sum(u.size for u in mine)
    t0 = time.perf_counter()
    if mine:
        _run(mine, st, out, strict, tok, nproc, total_bytes, progress)
    elapsed = time.perf_counter() - t0
    if task is not None:
        log(f"prep: task {task} of {tasks} done: {len(mine)} units, {total_bytes / 1e6:.1f} MB in "
            f"{elapsed:.1f} s; the merge step (the same arguments with --merge) writes the dataset")
        return None

    reports = [json.loads((done_dir / f"{u.uid}.json").read_text()) for u in units]
    manifest = _finish(out, st, tok, files, skipped, units, reports, fp)
    c = manifest["counts"]
    d = c["documents"]
    rate = total_bytes / 1e6 / elapsed if elapsed > 0 else 0.0
    log(f"prep: {d['read']} documents read, {d['written']} written, {sum(d['rejected'].values())} rejected "
        f"{d['rejected'] or ''}".rstrip() + f"; {c['files']['read']} files ({sum(c['files']['rejected'].values())} rejected); "
        f"train {c['splits']['train']['samples']} samples / {c['splits']['train']['tokens']} tokens, "
        f"val {c['splits']['val']['samples']} samples; {total_bytes / 1e6:.1f} MB in {elapsed:.1f} s "
        f"({rate:.1f} MB/s, {nproc} workers)")
    if d["written"] and not c["splits"]["train"]["samples"]:
        log(f"prep: warning: the train split is empty: the {d['written']} documents written all went to the "
            f"validation split (--val-fraction {st.val_fraction:g}, split by document; a .txt file is one "
            "document); lower --val-fraction or give more documents")
    if c["bad_total"]:
        log(f"prep: {c['bad_total']} bad inputs, listed in {out / 'errors.jsonl'}; first ones:")
        for b in manifest["errors"][:5]:
            log("  " + b["message"])
    return manifest


def _ours(name: str) -> bool:
    """Entries a prep run makes in OUT before its job.json is there (another array task's, maybe)."""
    return name == ".prep" or name.startswith(".megamom-probe-")


def _unfinished(todo: list[Unit], units: list[Unit], tasks: Optional[int]) -> str:
    msg = f"{len(todo)} of {len(units)} work units are not finished ({', '.join(u.uid for u in todo[:5])}"
    msg += ", ...)" if len(todo) > 5 else ")"
    if tasks:
        owner = assign_tasks(units, tasks)
        ids = sorted({owner[u.uid] for u in todo})
        return (f"{msg}: array task(s) {','.join(map(str, ids))} of {tasks} failed or did not run; rerun them "
                f"alone (sbatch --array={','.join(map(str, ids))} prep.sbatch with the same arguments), then "
                "the merge again")
    return f"{msg}: rerun the array tasks that failed, or `megamom prep` with the same arguments, then the merge"


def _run(todo, st, out, strict, tok, nproc, total_bytes, progress) -> None:
    from tqdm import tqdm

    jobs = [(u, st, str(out), strict) for u in todo]
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prep", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    try:
        if nproc == 1:
            init_worker(tok)
            for job in jobs:
                process_unit(job)
                bar.update(job[0].size)
            return
        import megamom.data.streaming_compat  # noqa: F401  (imported once here; forked workers share it)

        ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
        tok_arg = tok if tok.kind == "sentencepiece" else tok.path
        stop = ctx.Event()
        with ctx.Pool(nproc, initializer=init_worker, initargs=(tok_arg, stop), maxtasksperchild=None) as pool:
            try:
                # Largest units first: the pool's tail is then short.
                by_uid = {j[0].uid: j[0] for j in jobs}
                order = sorted(jobs, key=lambda j: -j[0].size)
                for rep in pool.imap_unordered(process_unit, order, chunksize=1):
                    bar.update(by_uid[rep["uid"]].size)
            except StrictStop:
                # the workers skip the units left and end on their own: killing them (terminate)
                # can leave the task queue's lock with a dead worker, and the pool's shutdown then
                # waits for it forever
                stop.set()
                pool.close()
                pool.join()
                raise
            except BaseException:
                pool.terminate()
                raise
    except StrictStop as e:
        bad = _resolve_lines([e.bad])[0]
        raise StrictStop(bad) from None
    finally:
        bar.close()


def _resolve_lines(bads: list[BadInput]) -> list[BadInput]:
    """Line numbers for bad input the worker knew only by byte offset (later byte ranges of a file,
    whole-file documents): one pass over each such file, counting newlines. Offsets are positions
    in the decompressed text, so compressed files are read decompressed."""
    from .inputs import classify
    from .readers import open_binary

    want: dict[str, list[int]] = {}
    for b in bads:
        if b.line is None and b.offset is not None and b.level == "document":
            want.setdefault(b.path, []).append(b.offset)
    lines: dict[tuple[str, int], int] = {}
    for path, offsets in want.items():
        offsets = sorted(set(offsets))
        kind = classify(path)
        f = InputFile(path, path, kind[0] if kind else "text", kind[1] if kind else None, 0, 0)
        try:
            with open_binary(f) as fh:
                pos, count, k = 0, 0, 0
                while k < len(offsets):
                    block = fh.read1(1 << 20)  # read1: a truncated archive still gives all it holds
                    if not block:
                        break
                    while k < len(offsets) and offsets[k] < pos + len(block):
                        lines[(path, offsets[k])] = count + block.count(b"\n", 0, offsets[k] - pos) + 1
                        k += 1
                    count += block.count(b"\n")
                    pos += len(block)
        except (OSError, EOFError, ValueError):  # unreadable or truncated: keep the lines found so far
            continue
    for b in bads:
        if b.line is None and (b.path, b.offset) in lines:
            b.line = lines[(b.path, b.offset)]
    return bads


def _merge_index(split_dir: Path, uids: list[str]) -> int:
    """One streaming index over the units' shards (basenames become `<uid>/shard...`)."""
    shards = []
    for uid in uids:
        idx = split_dir / uid / "index.json"
        if not idx.is_file():
            continue
        for shard in json.loads(idx.read_text())["shards"]:
            for key in ("raw_data", "zip_data", "raw_meta", "zip_meta"):
                if shard.get(key):
                    shard[key]["basename"] = f"{uid}/{shard[key]['basename']}"
            shards.append(shard)
    if shards:
        write_json_atomic(split_dir / "index.json", {"version": 2, "shards": shards})
    return sum(s["samples"] for s in shards)


def _finish(out: Path, st: PrepSettings, tok, files, skipped, units, reports, fp) -> dict:
    import megamom
    from megamom.data.streaming_compat import streaming_version

    docs_read = sum(r["documents_read"] for r in reports)
    rejected: dict[str, int] = {}
    files_rejected: dict[str, int] = {}
    for r in reports:
        for k, v in r["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
        for k, v in r["files_rejected"].items():
            files_rejected[k] = files_rejected.get(k, 0) + v
    splits = {}
    for name in SPLITS:
        agg = {"documents": 0, "tokens": 0, "samples": 0, "padding_tokens": 0}
        for r in reports:
            for k in agg:
                agg[k] += r["splits"][name][k]
        n = _merge_index(out / name, [u.uid for u in units]) if agg["samples"] else 0
        assert n == agg["samples"], f"index of {name} has {n} samples, reports say {agg['samples']}"
        splits[name] = agg
    written = splits["train"]["documents"] + splits["val"]["documents"]
    n_rejected = sum(rejected.values())
    if docs_read != written + n_rejected:  # the accounting promise; a failure here is a bug
        raise PrepError(f"internal error: {docs_read} documents read but {written} written + "
                        f"{n_rejected} rejected; please report it")
    bads = _resolve_lines([BadInput(**{k: v for k, v in b.items() if k != "message"})
                           for r in reports for b in r["bad"]])
    bad_total = sum(r["bad_total"] for r in reports)
    errors_file = out / "errors.jsonl"
    if bads:
        tmp = errors_file.with_name(".errors.jsonl.tmp")
        with open(tmp, "w") as f:
            for b in bads:
                f.write(json.dumps(b.to_dict()) + "\n")
        os.replace(tmp, errors_file)
    elif errors_file.exists():
        errors_file.unlink()
    manifest = {
        "format": FORMAT, "version": VERSION, "fingerprint": fp,
        "layout": st.layout, "seq_len": st.seq_len, "dtype": token_dtype(tok.vocab_size).__name__,
        "tokenizer": tok.info(),
        "settings": st.to_dict(),
        "inputs": [f.describe() for f in files],
        "skipped_files": skipped,
        "splits": {name: (name if splits[name]["samples"] else None) for name in SPLITS},
        "counts": {
            "files": {"read": len(files), "rejected": dict(sorted(files_rejected.items())),
                      "skipped_unsupported": len(skipped)},
            "documents": {"read": docs_read, "written": written, "rejected": dict(sorted(rejected.items())),
                          "utf8_replaced": sum(r["utf8_replaced"] for r in reports)},
            "blank_lines": sum(r["blank_lines"] for r in reports),
            "splits": splits,
            "bad_total": bad_total,
        },
        "errors": [b.to_dict() for b in bads[:100]],
        "errors_file": "errors.jsonl" if bads else None,
        "units": len(units),
        "software": {"megamom": megamom.__version__, "mosaicml-streaming": streaming_version},
    }
    write_json_atomic(out / MANIFEST, manifest)
    shutil.rmtree(out / ".prep", ignore_errors=True)
    return manifest


def read_manifest(path: str | Path) -> dict:
    """The manifest of a prepared dataset directory, with a clear error when it is missing."""
    p = Path(path) / MANIFEST
    if not p.is_file():
        hint = (" (an unfinished run is there: rerun the same `megamom prep` command to finish it)"
                if (Path(path) / ".prep").is_dir() else " (make one with `megamom prep`)")
        raise PrepError(f"{path} is not a prepared dataset: no {MANIFEST}{hint}")
    m = json.loads(p.read_text())
    if m.get("format") != FORMAT:
        raise PrepError(f"{p} is not a megamom prep manifest")
    if m.get("version", 0) > VERSION:
        raise PrepError(f"{p} has manifest version {m['version']}; this megamom reads up to {VERSION}: upgrade")
    return m


def documents_start_with_bos(paths) -> "bool | None":
    """Whether the prepared datasets at `paths` begin every document with BOS (`megamom prep --bos`),
    read off their manifests: the convention a model trained on them expects of a prompt. None when
    it cannot be told (a path without a local manifest) or the datasets disagree."""
    seen = set()
    for path in paths:
        p = Path(str(path).removeprefix("file://")) / MANIFEST
        if not p.is_file():
            return None
        seen.add(bool(json.loads(p.read_text()).get("settings", {}).get("add_bos", False)))
    return seen.pop() if len(seen) == 1 else None

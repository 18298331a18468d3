"""The recovery report's summary, recovered share, paired differences and files, on made-up
per-item results whose averages are known."""

import pytest

from idp_core.lab.recovery import IDP, markdown, plots, recovered, summarise


def _raw(acc_arc, acc_piqa, params, ppl=None):
    return {
        "params": params,
        "wikitext2_ppl": ppl,
        "tasks": {
            "arc_easy": {"kind": "multiple_choice", "group": "World knowledge", "num_items": 4,
                         "per_item": {"acc": acc_arc, "acc_norm": acc_arc},
                         "prefix_used": {"p0": 3, "p1": 1}},
            "piqa": {"kind": "multiple_choice", "group": "Common reasoning", "num_items": 4,
                     "per_item": {"acc": acc_piqa, "acc_norm": acc_piqa}},
            "lambada_openai": {"kind": "last_word", "group": "Language understanding",
                               "num_items": 2, "per_item": {"acc": [1.0, 0.0],
                                                            "loglik": [-1.0, -3.0]}},
        },
    }


@pytest.fixture
def summary():
    raw = {
        "uncompressed": _raw([1, 1, 1, 1], [1, 1, 0, 0], 0, 20.0),
        "compressed": _raw([1, 0, 0, 0], [1, 0, 0, 0], 0, 30.0),
        IDP: _raw([1, 1, 0, 0], [1, 1, 0, 0], 1152, 25.0),
    }
    return summarise(raw)


def test_averages_and_recovered_share(summary):
    rows = summary["rows"]
    # overall = mean over tasks of the primary metric, e.g. compressed (0.25 + 0.25 + 0.5) / 3
    assert rows["uncompressed"]["averages"]["Average"]["value"] == pytest.approx(2 / 3)
    assert rows["compressed"]["averages"]["Average"]["value"] == pytest.approx(1 / 3)
    assert rows[IDP]["averages"]["Average"]["value"] == pytest.approx(1.5 / 3)
    assert rows[IDP]["averages"]["World knowledge"]["value"] == pytest.approx(0.5)
    assert recovered(summary) == pytest.approx(0.5)  # (1/2 - 1/3) / (2/3 - 1/3)
    lam = rows[IDP]["tasks"]["lambada_openai"]
    assert lam["perplexity"] == pytest.approx(2.718281828 ** 2)
    for m in rows:
        lo, hi = rows[m]["averages"]["Average"]["ci"]
        assert lo <= rows[m]["averages"]["Average"]["value"] <= hi


def test_paired_differences(summary):
    gap = summary["differences"][0]
    assert (gap["a"], gap["b"]) == ("uncompressed", "compressed") and gap["diff"] > 0
    diffs = {d["b"]: d for d in summary["differences"] if d["a"] == IDP}
    assert set(diffs) == {"uncompressed", "compressed"}
    # IDP is never below compressed on any item, so no paired replicate can be negative
    assert diffs["compressed"]["ci"][0] >= 0
    assert diffs["uncompressed"]["diff"] < 0
    # items pooled: (4 arc + 4 piqa + 2 lambada) items; IDP wins one arc and one piqa item
    assert diffs["compressed"]["pooled_diff"] == pytest.approx(2 / 10, abs=0.02)
    assert diffs["compressed"]["pooled_ci"][0] >= 0


def test_files(summary, tmp_path):
    meta = {"model": "m", "command": "idp report --limit 4", "git": "abc1234", "dtype": "bfloat16",
            "date": "today", "limit": 4, "seed": 1, "ppl_windows": 8, "ppl_seq_len": 512,
            "rows_git": {"compressed": ["abc1234"], IDP: ["0f9d406", "abc1234"]}}
    text = markdown(summary, meta)
    # only rows whose tasks ran elsewhere than the render's commit are named
    assert "Git abc1234 (tasks ran at: +IDP 0f9d406, abc1234), dtype" in text
    assert "| +IDP | 50.0 | 50.0 | 50.0 |" in text
    assert "idp report --limit 4" in text and "1,152" in text
    # ppl 30 -> 25 of the 30 -> 20 increase: half of it won back
    assert "+IDP recovers 50% of the average-accuracy loss" in text
    assert "and 50% of the WikiText-2 perplexity increase" in text
    assert "p0 75%, p1 25%" in text
    assert "| items pooled | 95% CI | share <= 0 |" in text
    plots(summary, tmp_path)
    assert (tmp_path / "recovery_tasks.png").stat().st_size > 1000
    assert (tmp_path / "recovery_params.png").stat().st_size > 1000


def test_report_end_to_end_resumes_only_with_same_settings(tmp_path, capsys):
    """`idp report` on a tiny checkpoint: writes the grid, reuses a saved method on a rerun with
    the same settings, and reruns it when the settings change (no stale 100-item results in a
    500-item report)."""
    from servers import write_tiny_artefacts

    from idp_core.lab.cli import main
    from idp_core.lab.tasks import TASKS_DIR

    art = write_tiny_artefacts(tmp_path / "art")
    out = tmp_path / "report"

    def report(limit: int) -> str:
        assert main(["report", "--model", str(art["model"]), "--bank", str(art["bank"]),
                     "--lora", str(art["lora"]), "--methods", "compressed,idp",
                     "--tasks-dir", str(TASKS_DIR), "--tasks", "arc_easy", "--limit", str(limit),
                     "--dtype", "float32", "--ppl-windows", "1", "--ppl-seq-len", "32",
                     "--out", str(out)]) == 0
        return capsys.readouterr().out

    first = report(2)
    assert "== compressed" in first and "== +IDP" in first
    saved = (out / "recovery_raw" / "idp.json").read_text()
    assert "== " not in report(2)  # both reused
    assert (out / "recovery_raw" / "idp.json").read_text() == saved
    third = report(3)
    assert "run with other settings" in third and "== +IDP" in third
    assert '"arc_easy (n=3)"' in (out / "recovery.json").read_text() or \
        "arc_easy (n=3)" in (out / "recovery.md").read_text()
    manifest = art["bank"] / "manifest.json"  # another bank under the same path
    manifest.write_text(manifest.read_text() + "\n")
    fourth = report(3)
    assert "== compressed" not in fourth and "+IDP: " in fourth and "other settings" in fourth
    from safetensors.torch import load_file, save_file

    weights = art["model"] / "model.safetensors"  # another model under the same path
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 1.01
    save_file(tensors, weights, metadata={"format": "pt"})
    fifth = report(3)
    assert "compressed: " in fifth and "+IDP: " in fifth and "other settings" in fifth


def test_report_resumes_a_stopped_method_task_by_task(tmp_path, capsys, monkeypatch):
    """A method stopped between tasks keeps what it saved: the rerun runs only the missing task
    and ends with the results of an uninterrupted run."""
    import json

    from servers import write_tiny_artefacts

    from idp_core.lab import report as report_module
    from idp_core.lab.cli import main
    from idp_core.lab.tasks import TASKS_DIR

    art = write_tiny_artefacts(tmp_path / "art")
    out = tmp_path / "report"
    path = out / "recovery_raw" / "compressed.json"

    def report() -> str:
        assert main(["report", "--model", str(art["model"]), "--methods", "compressed",
                     "--tasks-dir", str(TASKS_DIR), "--tasks", "arc_easy,piqa", "--limit", "2",
                     "--dtype", "float32", "--ppl-windows", "1", "--ppl-seq-len", "32",
                     "--out", str(out)]) == 0
        return capsys.readouterr().out

    report()
    whole = json.loads(path.read_text())
    assert "partial" not in whole and set(whole["tasks"]) == {"arc_easy", "piqa"}
    path.unlink()
    evaluate = report_module.evaluate_task

    def stop_at_piqa(engine, task, **kw):  # the run is killed while it scores piqa
        if task.name == "piqa":
            raise KeyboardInterrupt
        return evaluate(engine, task, **kw)

    monkeypatch.setattr(report_module, "evaluate_task", stop_at_piqa)
    with pytest.raises(KeyboardInterrupt):
        report()
    capsys.readouterr()
    stopped = json.loads(path.read_text())
    assert stopped["partial"] and set(stopped["tasks"]) == {"arc_easy"}
    monkeypatch.setattr(report_module, "evaluate_task", evaluate)
    again = report()
    assert "resuming after 1 saved tasks" in again
    assert "arc_easy [none]" not in again and "piqa [none]" in again
    resumed = json.loads(path.read_text())
    assert "partial" not in resumed
    for task in ("arc_easy", "piqa"):
        a, b = whole["tasks"][task], resumed["tasks"][task]
        assert a["per_item"] == b["per_item"]
    assert resumed["wikitext2_ppl"] == pytest.approx(whole["wikitext2_ppl"])


def test_report_methods_can_name_one_prompt(tiny, tiny_bank):
    from idp_core.lab.report import report_methods

    rows = report_methods(tiny_bank, ["prompt:p1", "idp"])
    assert [(kind, sel) for _, kind, sel in rows] == [("prompt", "p1"), ("idp", "auto")]
    assert len(report_methods(tiny_bank, ["prompt"])) == 3
    with pytest.raises(ValueError, match="prompt:nope"):
        report_methods(tiny_bank, ["prompt:nope"])


def test_rows_git_names_the_commits_each_rows_tasks_ran_at():
    from idp_core.lab.report import rows_git

    raw = {"+IDP": {"tasks": {"arc": {"git": "0123456789ab+uncommitted"},
                              "piqa": {"git": "fedcba987654"}, "sciq": {"git": "fedcba987654"}}},
           "old": {"tasks": {"arc": {}}}}
    assert rows_git(raw) == {"+IDP": ["0123456+uncommitted", "fedcba9"], "old": []}


def test_git_commit_ignores_the_runs_own_output(tmp_path):
    """A report rewrites its tracked records as it runs; only changes elsewhere mark the
    commit "+uncommitted"."""
    import subprocess

    from idp_core.lab.provenance import git_commit

    def git(*argv):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *argv], cwd=tmp_path,
                       check=True, capture_output=True)

    (tmp_path / "out").mkdir()
    (tmp_path / "code.py").write_text("a = 1\n")
    (tmp_path / "out" / "raw.json").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "x")
    head = git_commit(repo=tmp_path)
    assert len(head) == 40 and not head.endswith("+uncommitted")
    (tmp_path / "out" / "raw.json").write_text('{"tasks": 1}\n')
    assert git_commit(repo=tmp_path, ignore=tmp_path / "out") == head
    assert git_commit(repo=tmp_path) == head + "+uncommitted"
    (tmp_path / "code.py").write_text("a = 2\n")
    assert git_commit(repo=tmp_path, ignore=tmp_path / "out") == head + "+uncommitted"


def test_compare_two_saved_rows_item_by_item():
    """`idp compare`: a - b per task and over every item, against the obvious arithmetic; rows
    scored on other items are refused."""
    from idp_core.lab.recovery import compare_markdown, compare_rows

    settings = {"limit": 4, "seed": 1, "tasks": ["arc_easy", "lambada_openai", "piqa"]}
    a = {**_raw([1, 1, 0, 0], [1, 1, 1, 0], 1), "settings": settings}
    b = {**_raw([1, 0, 0, 0], [1, 1, 0, 0], 1), "settings": {**settings, "bank": "other"}}
    c = compare_rows(a, b, names=("new", "old"))
    assert c["tasks"]["arc_easy"]["diff"] == pytest.approx(0.25)
    assert c["tasks"]["piqa"]["diff"] == pytest.approx(0.25)
    assert c["tasks"]["lambada_openai"]["diff"] == 0.0
    assert c["diff"] == pytest.approx((0.25 + 0.25 + 0) / 3)
    assert c["pooled_diff"] == pytest.approx(2 / 10)
    lo, hi = c["tasks"]["arc_easy"]["ci"]
    assert 0 <= lo <= 0.25 <= hi  # a never below b on an item: no replicate below 0
    assert "| arc_easy | 4 | 50.0 | 25.0 | 25.0 |" in compare_markdown(c)
    with pytest.raises(ValueError, match="other items: limit 4 vs 500"):
        compare_rows(a, {**b, "settings": {**settings, "limit": 500}})


def test_tasks_of_one_size_are_resampled_independently():
    # Two tasks with the same per-item results: resampled independently, the average's
    # bootstrap spread is each task's / sqrt(2); with shared indices it would equal it.
    import numpy as np

    rng = np.random.default_rng(0)
    acc = [float(x) for x in rng.integers(0, 2, 200)]
    task = {"kind": "multiple_choice", "group": "World knowledge", "num_items": 200,
            "per_item": {"acc": acc}}
    raw = {"a": {"params": 0, "tasks": {"arc_easy": task, "arc_challenge": task}}}
    row = summarise(raw)["rows"]["a"]

    def width(ci):
        return ci[1] - ci[0]

    ratio = width(row["averages"]["Average"]["ci"]) / width(row["tasks"]["arc_easy"]["acc_ci"])
    assert ratio == pytest.approx(2 ** -0.5, abs=0.08)

"""The recovery curve's data split and gap arithmetic (the training is tested elsewhere)."""

import json
import math

import pytest
import torch
from tiny import byte_tokenizer

from idp_core.lab.curve import (
    Method,
    bootstrap,
    bootstrap_difference,
    share,
    slug,
    split_sources,
    training_chunks,
)


def test_gap_share_of_perplexity_and_kl():
    base, target = [math.log(30.0)] * 4, [math.log(20.0)] * 4
    assert share(base, [math.log(25.0)] * 4, target, perplexity=True) == pytest.approx(0.5)
    assert share([0.4] * 3, [0.1] * 3, [0.0] * 3, perplexity=False) == pytest.approx(0.75)
    est, lo, hi = bootstrap([0.4, 0.5, 0.3, 0.6], [0.1, 0.3, 0.1, 0.2], [0.0] * 4,
                            perplexity=False)
    assert lo <= est <= hi and est == pytest.approx(1 - 0.7 / 1.8)
    same = bootstrap_difference([0.4, 0.5, 0.3], [0.1, 0.3, 0.2], [0.1, 0.3, 0.2], [0.0] * 3,
                                perplexity=False)
    assert same == (0.0, 0.0, 0.0)
    est, lo, hi = bootstrap_difference([0.4, 0.5, 0.3], [0.1, 0.1, 0.1], [0.2, 0.2, 0.2],
                                       [0.0] * 3, perplexity=False)
    assert est == pytest.approx(0.25) and lo <= est <= hi


def test_held_out_records_never_reach_training(tmp_path):
    (tmp_path / "domains").mkdir()
    (tmp_path / "calib").mkdir()
    for name in ("code", "news"):
        with (tmp_path / "domains" / f"{name}.jsonl").open("w") as f:
            for i in range(20):
                f.write(json.dumps({"text": f"{name} record {i:02d} " * 8}) + "\n")
    with (tmp_path / "calib" / "c4_sample.jsonl").open("w") as f:
        for i in range(10):
            f.write(json.dumps({"text": f"c4 doc {i:02d} " * 8}) + "\n")
    sources = split_sources(tmp_path)
    assert sorted(sources) == ["c4", "code", "news"]
    train, held = sources["code"]
    assert len(held) == 2 and held[0].startswith("code record 18")
    tok = byte_tokenizer()
    chunks = training_chunks(tok, sources, num_tokens=600, seq_len=32)
    text = tok.decode(chunks.flatten().tolist())
    assert "record 18" not in text and "record 19" not in text and "doc 09" not in text
    assert "code record" in text and "news record" in text and "c4 doc" in text
    with pytest.raises(FileNotFoundError, match="recovery data missing"):
        split_sources(tmp_path / "nowhere")


def test_method_specs():
    m = Method.parse("shallow16-lm@0.1/vocab")
    assert (m.family, m.size, m.loss, m.lr, m.init) == ("shallow", 16, "lm", 0.1, "vocab")
    assert Method.parse("deep8-kd").lr == 1e-2 and Method.parse("lora4-mix").init == "text"
    decayed = Method.parse("deep16-kd@1e-2/vocab+cos")
    assert (decayed.lr, decayed.init, decayed.schedule) == (1e-2, "vocab", "cosine")
    assert Method.parse("deep16-kd").schedule == "constant"
    assert slug(decayed) == "deep16-kd-lr1e-2-vocab-cos"
    mlp = Method.parse("deep16-kd@3e-4+mlp+cos")
    assert (mlp.lr, mlp.reparam, mlp.schedule) == (3e-4, "mlp", "cosine")
    assert decayed.reparam is None and slug(mlp) == "deep16-kd-lr3e-4-mlp-cos"
    with pytest.raises(ValueError, match=r"\+mlp reparameterises a deep prompt only"):
        Method.parse("lora4-kd+mlp")
    with pytest.raises(ValueError, match="write <shallow|deep|lora>"):
        Method.parse("deep-kd")


def _write_data(folder):
    for sub in ("domains", "calib", "eval"):
        (folder / sub).mkdir(parents=True)
    for name in ("code", "news"):
        with (folder / "domains" / f"{name}.jsonl").open("w") as f:
            for i in range(30):
                f.write(json.dumps({"text": f"{name} {i} " + "some words here " * 20}) + "\n")
    with (folder / "calib" / "c4_sample.jsonl").open("w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"doc {i} " + "web text " * 30}) + "\n")
    with (folder / "eval" / "wikitext2_raw_test.rows.jsonl").open("w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f" = Heading {i} = \n" + "wiki words " * 30}) + "\n")


def _write_models_and_data(folder):
    """A tiny student and teacher (HF folders) and a tiny data folder, under `folder`."""
    from tiny import tiny_llama

    for name, seed in (("student", 0), ("teacher", 1)):
        lm = tiny_llama(seed=seed)
        lm.model.save_pretrained(folder / name)
        lm.tokenizer.save_pretrained(folder / name)
    _write_data(folder / "data")


def test_curve_end_to_end_resumes_and_exports(tmp_path):
    """`idp curve` on a tiny student and teacher: records every milestone, renders, exports a
    bank and an adapter, and a rerun with one more milestone trains only the extra steps."""
    from idp_core.bank import PromptBank
    from idp_core.lab.cli import main

    _write_models_and_data(tmp_path)
    args = ["curve", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data", str(tmp_path / "data"), "--methods", "deep2-kd,shallow2-lm,lora2-kd",
            "--seq-len", "16", "--batch-size", "2", "--windows", "2", "--wikitext-windows", "2",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert main([*args, "--milestones", "32,64"]) == 0
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    deep = record["methods"]["deep2-kd"]
    assert [m["tokens"] for m in deep["milestones"]] == [32, 64]
    assert [m["steps"] for m in deep["milestones"]] == [1, 2]
    assert set(deep["milestones"][0]["scores"]) == {"code", "news", "c4", "wikitext2"}
    assert deep["trainable_parameters"] == 2 * 2 * 2 * 2 * 16  # k,v x layers x heads x n x D
    assert (tmp_path / "out" / "curve.md").read_text().count("| deep2-kd | 256 |") == 2
    assert (tmp_path / "out" / "curve.png").stat().st_size > 1000
    bank = PromptBank.load(tmp_path / "work" / "deep2-kd-bank")
    assert bank.kind == "deep" and bank.training["tokens"] == 64
    made = {"batch_size": 2, "steps": 2, "commit": deep["milestones"][-1]["commit"],
            "made_by": record["command"]}
    assert made.items() <= bank.training.items()
    assert bank.training["made_by"].startswith("idp curve --methods deep2-kd,shallow2-lm")
    adapter = tmp_path / "work" / "lora2-kd-adapter"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "train.json"]
    meta = json.loads((adapter / "train.json").read_text())
    assert made.items() <= meta.items()
    assert meta["rank"] == 2 and meta["loss"] == "kd"
    assert meta["num_parameters"] == record["methods"]["lora2-kd"]["trainable_parameters"]
    assert "| deep2-kd | lora2-kd | 64 |" in (tmp_path / "out" / "curve.md").read_text()
    assert main([*args, "--milestones", "32,64,96"]) == 0  # resumes each method from step 2
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    for entry in record["methods"].values():
        assert [m["steps"] for m in entry["milestones"]] == [1, 2, 3]
    runs = [r["command"].split(" --milestones ")[1].split()[0] for r in record["runs"]]
    assert runs == ["32,64", "32,64,96"]  # both commands are named in the table's header
    assert (tmp_path / "out" / "curve.md").read_text().count("`idp curve --methods deep2-kd") == 2
    # Distillation against the teacher's cached top-k: another objective, so another record.
    with pytest.raises(SystemExit, match="recorded with other settings"):
        main([*args, "--milestones", "32", "--teacher-top-k", "8"])
    topk = [a if a != str(tmp_path / "out") else str(tmp_path / "out-top8") for a in args]
    topk = [a if a != str(tmp_path / "work") else str(tmp_path / "work-top8") for a in topk]
    assert main([*topk, "--milestones", "32", "--teacher-top-k", "8"]) == 0
    record = json.loads((tmp_path / "out-top8" / "curve.json").read_text())
    assert record["settings"]["teacher_top_k"] == 8
    assert (tmp_path / "work-top8" / "teacher-top8.safetensors").is_file()
    assert [m["steps"] for m in record["methods"]["deep2-kd"]["milestones"]] == [1]


def test_curve_extends_past_its_pool_exactly(tmp_path):
    """A curve recorded to 32 tokens extended to 64 cycles over its pool (3 chunks) and reaches
    what an uninterrupted run to 64 tokens over the same pool reaches."""
    from idp_core.lab.cli import main

    _write_models_and_data(tmp_path)

    def curve(out, *extra):
        args = ["curve", "--model", str(tmp_path / "student"), "--teacher",
                str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--methods",
                "deep2-kd", "--seq-len", "16", "--batch-size", "2", "--windows", "1",
                "--wikitext-windows", "1", "--out", str(tmp_path / out), "--work",
                str(tmp_path / f"{out}-work"), *extra]
        assert main(args) == 0
        return json.loads((tmp_path / out / "curve.json").read_text())

    short = curve("a", "--milestones", "32")
    assert short["settings"]["data"]["train_chunks"] == 3  # one chunk per source
    extended = curve("a", "--milestones", "32,64")  # the recorded pool is kept
    whole = curve("b", "--milestones", "32,64", "--pool-tokens", "32")
    assert extended["settings"] == whole["settings"]
    got = extended["methods"]["deep2-kd"]["milestones"][-1]
    want = whole["methods"]["deep2-kd"]["milestones"][-1]
    assert got["steps"] == want["steps"] == 2
    assert got["scores"] == want["scores"]
    with pytest.raises(SystemExit, match=r"other settings \(data\)"):
        curve("a", "--milestones", "32,64", "--pool-tokens", "64")
    assert extended["methods"]["deep2-kd"]["batch_size"] == 2
    with pytest.raises(SystemExit, match="deep2-kd was recorded with batch size 2, not 1"):
        curve("a", "--milestones", "32,64,96", "--batch-size", "1")


def test_a_decayed_method_is_compared_with_its_constant_twin(tmp_path):
    """`deep2-kd+cos` decays its learning rate to 0 at the last milestone: it is compared with
    `deep2-kd` in the table, its export says so, and it cannot be extended past its horizon."""
    from idp_core.bank import PromptBank
    from idp_core.lab.cli import main

    _write_models_and_data(tmp_path)
    args = ["curve", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data", str(tmp_path / "data"), "--methods", "deep2-kd,deep2-kd+cos,lora2-kd",
            "--seq-len", "16", "--batch-size", "2", "--windows", "1", "--wikitext-windows", "1",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]
    assert main([*args, "--milestones", "32,256"]) == 0  # 8 steps: 5 of warm-up, 3 of decay
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    decayed, constant = record["methods"]["deep2-kd+cos"], record["methods"]["deep2-kd"]
    assert decayed["schedule_steps"] == 8 and "schedule_steps" not in constant
    assert decayed["milestones"][0]["scores"] == constant["milestones"][0]["scores"]
    assert decayed["milestones"][1]["scores"] != constant["milestones"][1]["scores"]
    rows = (tmp_path / "out" / "curve.md").read_text().splitlines()
    pairs = [r.split(" | ")[:3] for r in rows if r.count(" | ") == 6 and " | 256 | " in r]
    # the decayed prompt meets its constant twin, and not the constant LoRA
    assert pairs == [["| deep2-kd", "lora2-kd", "256"], ["| deep2-kd+cos", "deep2-kd", "256"]]
    assert PromptBank.load(tmp_path / "work" / "deep2-kd-cos-bank").training["schedule"] == "cosine"
    with pytest.raises(SystemExit, match="cannot be extended"):
        main([*args, "--milestones", "32,256,288"])


def test_a_reparameterised_prompt_exports_only_the_prompt_and_meets_its_plain_twin(tmp_path):
    """`deep2-kd@1e-3+mlp` trains the MLP's weights; its bank holds the prompt alone (the shape
    of a plain deep prompt), and the table sets it against the plain prompt and the LoRA."""
    from idp_core.bank import PromptBank
    from idp_core.lab.cli import main

    _write_models_and_data(tmp_path)
    args = ["curve", "--model", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"),
            "--data", str(tmp_path / "data"), "--methods", "deep2-kd,deep2-kd@1e-3+mlp,lora2-kd",
            "--seq-len", "16", "--batch-size", "2", "--windows", "1", "--wikitext-windows", "1",
            "--milestones", "32,64", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w")]
    assert main(args) == 0
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    plain, mlp = record["methods"]["deep2-kd"], record["methods"]["deep2-kd@1e-3+mlp"]
    assert plain["trainable_parameters"] == 256
    # embeddings [n=2, d=64] + up [512, d] + 512 + down [k,v x layers x heads x D = 128, 512] + 128
    assert mlp["trainable_parameters"] == 2 * 64 + 512 * 64 + 512 + 128 * 512 + 128
    assert mlp["milestones"][-1]["scores"] != plain["milestones"][-1]["scores"]
    bank = PromptBank.load(tmp_path / "w" / "deep2-kd-lr1e-3-mlp-bank")
    assert bank.kind == "deep" and bank.num_parameters == 256
    assert bank.training["reparam"] == "mlp"
    rows = (tmp_path / "out" / "curve.md").read_text().splitlines()
    pairs = [r.split(" | ")[:3] for r in rows if r.count(" | ") == 6 and " | 64 | " in r]
    assert pairs == [["| deep2-kd", "lora2-kd", "64"], ["| deep2-kd@1e-3+mlp", "deep2-kd", "64"],
                     ["| deep2-kd@1e-3+mlp", "lora2-kd", "64"]]


def test_the_pool_scored_in_sample_against_a_direct_computation(tmp_path):
    """`--score-pool` scores the training chunks themselves as set 'pool': per chunk, the mean
    NLL and KL of the exported prompt there, computed directly; the held-out sets and their
    'mixed' pooling are what a run without it records, and the table shows the in-sample share."""
    from idp_core.bank import PromptBank
    from idp_core.lab.cli import main
    from idp_core.lab.curve import training_chunks
    from idp_core.lab.objective import student_logits, teacher_logprobs, token_kl, token_nll
    from idp_core.model import load_model

    _write_models_and_data(tmp_path)

    def curve(out, *extra):
        args = ["curve", "--model", str(tmp_path / "student"), "--teacher",
                str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--methods",
                "deep2-kd", "--seq-len", "16", "--batch-size", "2", "--windows", "1",
                "--wikitext-windows", "1", "--milestones", "32,96", "--pool-tokens", "48",
                "--out", str(tmp_path / out),
                "--work", str(tmp_path / f"{out}-work"), *extra]
        assert main(args) == 0
        return json.loads((tmp_path / out / "curve.json").read_text())

    plain, scored = curve("plain"), curve("scored", "--score-pool")
    assert scored["settings"]["data"]["scored_in_sample"] is True
    assert scored["command"].endswith(" --score-pool --dtype float32 --device cpu --out "
                                      f"{tmp_path / 'scored'} --work {tmp_path / 'scored-work'}")
    last = scored["methods"]["deep2-kd"]["milestones"][-1]["scores"]
    held = {k: v for k, v in last.items() if k != "pool"}
    assert held == plain["methods"]["deep2-kd"]["milestones"][-1]["scores"]

    student, teacher = (load_model(tmp_path / name, dtype="float32")
                        for name in ("student", "teacher"))
    sources = split_sources(tmp_path / "data")
    chunks = training_chunks(student.tokenizer, sources, num_tokens=48, seq_len=16)
    assert len(last["pool"]["nll"]) == len(chunks) == 3
    prompt = PromptBank.load(tmp_path / "scored-work" / "deep2-kd-bank").prompts[0]
    for i, ids in enumerate(chunks):
        with torch.no_grad():
            logits = student_logits(student.model, ids[None], prompt)
            kl = token_kl(logits, teacher_logprobs(teacher.model, ids[None])).mean()
            nll = token_nll(logits, ids[None]).mean()
        assert last["pool"]["kl"][i] == pytest.approx(kl.item(), abs=2e-6)
        assert last["pool"]["nll"][i] == pytest.approx(nll.item(), abs=2e-6)

    table = (tmp_path / "scored" / "curve.md").read_text()
    assert "In-sample: the training pool itself (3 chunks" in table
    assert "| deep2-kd | 256 | 96 | 2 |" in table  # 96 tokens = two passes over 48
    assert "In-sample" not in (tmp_path / "plain" / "curve.md").read_text()
    with pytest.raises(SystemExit, match="recorded with other settings"):
        curve("plain", "--score-pool")

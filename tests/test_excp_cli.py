"""``python -m callbacks.excp``: HF Trainer folders and Lightning .ckpt series round trip; bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from callbacks.excp.cli import main

ROOT = Path(__file__).resolve().parents[1]



def _hf_series(root: Path) -> list[Path]:
    """Checkpoint folders laid out like transformers.Trainer writes them (built offline, tiny)."""
    from transformers import LlamaForCausalLM

    from common.hf_loading import config_from_dict, tiny_llama_config

    torch.manual_seed(0)
    cfg = config_from_dict(tiny_llama_config(vocab_size=64, hidden_size=32, intermediate_size=64))
    model = LlamaForCausalLM(cfg)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    dirs = []
    for step in (2, 4, 6):
        for _ in range(2):
            ids = torch.randint(0, 64, (4, 16))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
        d = root / f"checkpoint-{step}"
        model.save_pretrained(d)
        torch.save(opt.state_dict(), d / "optimizer.pt")
        torch.save(sched.state_dict(), d / "scheduler.pt")
        torch.save({"python": 1, "cpu": torch.get_rng_state()}, d / "rng_state.pth")
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
        dirs.append(d)
    return dirs


def test_hf_trainer_folders_round_trip(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dirs = _hf_series(tmp_path / "run")
    out = tmp_path / "excp"
    # given out of order: the CLI orders the series by step
    assert main(["compress", str(dirs[2]), str(dirs[0]), str(dirs[1]), "-o", str(out)]) == 0
    files = [out / f"checkpoint-{s}.excp" for s in (2, 4, 6)]
    assert all(f.is_file() for f in files)
    capsys.readouterr()
    assert main(["inspect", str(files[2]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "delta" and info["format"] == "hf_trainer" and len(info["chain"]) == 3
    assert info["ratio"] > 3 and set(info["bits_per_param"]) == {"w", "m", "v"}
    assert main(["decompress", str(files[2]), "-o", str(tmp_path / "back")]) == 0
    back = tmp_path / "back" / "checkpoint-6"
    orig = dirs[2]
    # non-tensor files come back byte-identical
    for name in ("config.json", "scheduler.pt", "rng_state.pth", "trainer_state.json"):
        assert (back / name).read_bytes() == (orig / name).read_bytes(), name
    # the tool that wrote them loads them
    m_orig = AutoModelForCausalLM.from_pretrained(orig)
    m_back = AutoModelForCausalLM.from_pretrained(back)
    m_first = AutoModelForCausalLM.from_pretrained(dirs[0])
    params = zip(m_orig.named_parameters(), m_back.parameters(), m_first.parameters(), strict=True)
    for (n, a), b, first in params:
        # closed loop: the error is at most what was pruned, i.e. bounded by the training updates
        assert a.shape == b.shape
        assert (a - b).abs().max() <= 2 * (a - first).abs().max() + 1e-7, n
    opt_sd = torch.load(back / "optimizer.pt", weights_only=False)
    orig_sd = torch.load(orig / "optimizer.pt", weights_only=False)
    assert opt_sd["param_groups"] == orig_sd["param_groups"]
    assert torch.equal(opt_sd["state"][0]["step"], orig_sd["state"][0]["step"])
    decay = [p for p in m_back.parameters() if p.ndim >= 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": [p for p in m_back.parameters() if p.ndim < 2]}])
    opt.load_state_dict(opt_sd)
    for idx, st in orig_sd["state"].items():
        assert opt.state_dict()["state"][idx]["exp_avg"].shape == st["exp_avg"].shape
    # the keyframe is lossless
    assert main(["decompress", str(files[0]), "-o", str(tmp_path / "back0")]) == 0
    m0 = AutoModelForCausalLM.from_pretrained(tmp_path / "back0" / "checkpoint-2")
    m0o = AutoModelForCausalLM.from_pretrained(dirs[0])
    assert all(torch.equal(a, b) for a, b in zip(m0.parameters(), m0o.parameters(), strict=True))


def test_lightning_ckpt_series_round_trip(tmp_path, capsys):
    net = torch.nn.Linear(16, 8)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    paths = []
    for step in range(3):
        net(torch.randn(4, 16)).sum().backward()
        opt.step()
        p = tmp_path / f"epoch=0-step={step}.ckpt"
        torch.save(
            {"global_step": step, "state_dict": net.state_dict(), "optimizer_states": [opt.state_dict()]}, p
        )
        paths.append(p)
    assert main(["compress", *map(str, paths), "-o", str(tmp_path / "c"), "--bits-w", "8"]) == 0
    assert main(["inspect", *[str(tmp_path / "c" / (p.stem + ".excp")) for p in paths]]) == 0
    assert "chain:" in capsys.readouterr().out
    assert (
        main(["decompress", str(tmp_path / "c" / (paths[2].stem + ".excp")), "-o", str(tmp_path / "d")]) == 0
    )
    back = torch.load(tmp_path / "d" / paths[2].name, weights_only=False)
    assert back["global_step"] == 2 and back["state_dict"]["weight"].shape == (8, 16)


def test_bad_input_is_one_line_and_nonzero(tmp_path, capsys):
    junk = tmp_path / "junk.excp"
    junk.write_bytes(b"not a checkpoint at all")
    cases = [
        ["inspect", str(junk)],
        ["decompress", str(tmp_path / "missing.excp"), "-o", str(tmp_path)],
        ["compress", str(tmp_path), "-o", str(tmp_path / "o")],  # a folder with no safetensors
        ["compress", str(junk), "-o", str(tmp_path / "o")],
    ]
    for argv in cases:
        assert main(argv) == 1, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("excp: error:"), (argv, lines)
    # through the real entry point: exit codes and no traceback
    for argv, code in ((["inspect", str(junk)], 1), (["inspect"], 2)):
        r = subprocess.run(
            [sys.executable, "-m", "callbacks.excp", *argv],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == code, argv
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("excp: error:"), (argv, r.stderr)


def test_inspect_names_the_tensors_kept_exactly_besides_w_m_v(tmp_path, capsys):
    """AMSGrad's max_exp_avg_sq is as large as v and stored losslessly: inspect says so and gives the
    ratio against every raw tensor, so a low ratio against W+m+v is not left unexplained."""
    from callbacks.excp import ExCPEncoder, ExCPSettings
    from common.atomic import atomic_write_bytes

    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, amsgrad=True)
    encoder = ExCPEncoder(ExCPSettings(kmeans_sample=256))
    paths = []
    for step in (1, 2):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ckpt = {"global_step": step, "state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]}
        path = tmp_path / f"step{step}.ckpt"
        encoded = encoder.encode(ckpt, target=path, optimizer_param_names=[["weight", "bias"]])
        atomic_write_bytes(path, encoded.data)
        encoder.commit(encoded, path)
        paths.append(path)
    capsys.readouterr()
    assert main(["inspect", str(paths[1]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    exact = info["kept_exactly"]
    assert exact["largest"][0] == "optimizer_states/0/state/0/max_exp_avg_sq"
    assert exact["raw_bytes"] >= 64 * 64 * 4  # the weight's max_exp_avg_sq at least
    assert info["ratio_vs_raw_tensors"] == info["raw_tensor_bytes"] / info["bytes"]
    assert main(["inspect", str(paths[1])]) == 0
    text = capsys.readouterr().out
    assert "kept exactly besides W, m, v" in text and "max_exp_avg_sq" in text and "vs every raw tensor" in text

    # crafted headers (checksums recomputed): an unknown dtype is one line, as loading says it; statistics a
    # header lacks or garbles print as n/a instead of a traceback
    from tests.excp_crafting import rewrite

    def crafted(name: str, mutate) -> str:
        path = tmp_path / name
        atomic_write_bytes(path, rewrite(paths[0].read_bytes(), mutate))
        return str(path)

    unknown = crafted("dtype.ckpt", lambda h: h["extras"][0].__setitem__("dtype", "float99"))
    assert main(["inspect", unknown]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "unknown tensor dtype 'float99'" in lines[0]
    garbled = crafted("stats.ckpt", lambda h: h.__setitem__("stats", {"params": "many", "raw_wmv_bytes": None}))
    assert main(["inspect", garbled]) == 0
    text = capsys.readouterr().out
    assert "n/a vs fp32 W+m+v (n/a), n/a params" in text and "n/a vs every raw tensor (n/a)" in text

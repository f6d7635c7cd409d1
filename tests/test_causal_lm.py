"""CausalLMModule on a tiny model: fit, validate, resume, schedule, and bad input."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from common.hf_loading import ModelLoadError, load_causal_lm
from datamodules.text import TextDataModule
from lightning_modules.causal_lm import CausalLMModule, warmup_cosine


def _corpus(tmp_path: Path) -> Path:
    text = "".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_warmup_cosine_shape() -> None:
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(20, 4, 20, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine(12, 4, 20, 0.1)
    assert 0.1 < mid < 1.0


def test_fit_lowers_loss_then_resume_continues_exactly(tmp_path: Path, tiny_model_config, cpu_trainer_kwargs) -> None:
    L.seed_everything(0)
    corpus = _corpus(tmp_path)
    module = CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=3e-3, warmup_steps=2)
    data = TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.1)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=-1)
    kwargs = {**cpu_trainer_kwargs, "enable_checkpointing": True}
    trainer = L.Trainer(max_steps=20, callbacks=[checkpoint], val_check_interval=10, **kwargs)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < before - 0.5, (before, after)

    step10 = tmp_path / "ckpt" / "epoch=0-step=10.ckpt"
    assert step10.is_file()
    restored = CausalLMModule.load_from_checkpoint(step10)  # hyperparameters alone rebuild the module
    assert restored.hparams.model_config == tiny_model_config
    resumed = L.Trainer(max_steps=20, **cpu_trainer_kwargs)
    resumed.fit(CausalLMModule(model=None, model_config=tiny_model_config, learning_rate=3e-3, warmup_steps=2),
                datamodule=TextDataModule(source=str(corpus), block_size=32, batch_size=4, val_fraction=0.1),
                ckpt_path=step10)
    assert resumed.global_step == 20
    lr_resumed = resumed.optimizers[0].param_groups[0]["lr"]
    lr_original = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr_resumed == pytest.approx(lr_original)
    # the same batches in the same order, the same optimizer state: the same weights as never stopping
    uninterrupted = module.state_dict()
    for name, tensor in resumed.lightning_module.state_dict().items():
        torch.testing.assert_close(tensor, uninterrupted[name], rtol=0, atol=1e-6, msg=name)


def test_validate_reports_token_weighted_loss_and_ppl(tmp_path: Path, tiny_model_config, cpu_trainer_kwargs) -> None:
    module = CausalLMModule(model=None, model_config=tiny_model_config)
    data = TextDataModule(source=str(_corpus(tmp_path)), block_size=32, batch_size=4, val_fraction=0.2)
    metrics = L.Trainer(**cpu_trainer_kwargs).validate(module, datamodule=data, verbose=False)[0]
    assert metrics["val/ppl"] == pytest.approx(torch.exp(torch.tensor(metrics["val/loss"])).item(), rel=1e-5)
    # A random model over a 384-token vocabulary is close to uniform.
    assert 100 < metrics["val/ppl"] < 1500


def test_weight_decay_skips_biases_and_norms(tiny_model_config) -> None:
    module = CausalLMModule(model=None, model_config=tiny_model_config)
    groups = module._parameter_groups()
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.ndim < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0


def test_bad_input_gives_clear_errors(tmp_path: Path, tiny_model_config) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_causal_lm("./no/such/model")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ModelLoadError, match="model_type"):
        load_causal_lm(model_config={"hidden_size": 8})
    with pytest.raises(ValueError, match="optimizer"):
        CausalLMModule(model=None, model_config=tiny_model_config, optimizer="lion")
    small_vocab = {**tiny_model_config, "vocab_size": 100}
    with pytest.raises(ValueError, match="vocab_size"):
        CausalLMModule(model=None, model_config=small_vocab)


def test_unknown_hub_id_offline_names_the_alternative(monkeypatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; the env is too late
    with pytest.raises(ModelLoadError, match="smollm2-135m-instruct"):
        load_causal_lm("no-such-org/no-such-model-xyz")


def test_train_ppl_is_logged_on_logging_steps(tmp_path: Path, tiny_model_config, cpu_trainer_kwargs) -> None:
    import csv

    from lightning.pytorch.loggers import CSVLogger

    module = CausalLMModule(model=None, model_config=tiny_model_config)
    data = TextDataModule(source=str(_corpus(tmp_path)), block_size=32, batch_size=4, val_fraction=0.1)
    logger = CSVLogger(tmp_path, name="csv")
    kwargs = {**cpu_trainer_kwargs, "logger": logger}
    L.Trainer(max_steps=4, log_every_n_steps=2, limit_val_batches=0, **kwargs).fit(module, datamodule=data)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    logged = [row for row in rows if row.get("train/ppl")]
    assert [int(row["step"]) for row in logged] == [1, 3]
    for row in logged:
        expected_ppl = torch.exp(torch.tensor(float(row["train/loss"]))).item()
        assert float(row["train/ppl"]) == pytest.approx(expected_ppl, rel=1e-4)

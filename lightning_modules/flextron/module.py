"""FlextronModule: elastic continued training of a pretrained causal LM with budget routers.

Training runs in three stages, by optimizer step:

1. ``elastic`` (``elastic_steps``): the LLM learns to work at many widths. Each step trains the full
   model with probability ``full_prob``, otherwise a random nested sub-network.
2. ``router`` (``router_steps``): the LLM is frozen; routers learn to pick per-layer widths that meet
   the requested budget at the lowest loss.
3. ``joint`` (the rest): routers and LLM train together on the routed sub-networks.

The loss is distillation from the frozen full model (``kd``), the LM loss (``lm``) or both, plus
``budget_weight`` times the budget loss. Routers learn from it either directly, through the width
masks (``router_update="direct"``), or through the paper's loss surrogate (``"surrogate"``), which is
trained on observed losses and steers the routers only once its relative error is below
``surrogate_threshold``.

Every rank samples the same budget each step (a generator seeded by the step), conversion scores are
summed over ranks before sorting, and the latency table is measured on rank zero and broadcast, so
all ranks hold the same permutation, table and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from typing_extensions import override

from common.hf_loading import BYTE_TOKENIZER, load_causal_lm, load_tokenizer
from lightning_modules.schedules import warmup_cosine
from lightning_modules.sharding import configure_sharding, refuse_strategy

from .budgets import METRICS, CostTable, cost_table
from .constrained import RTOL, constrained_choices, min_cost
from .elastic import ElasticLM, SubnetConfig, WidthSpace
from .importance import activation_importance, sort_by_importance
from .losses import LOSSES, lm_loss, task_loss
from .routers import (
    DynamicRouter,
    LossSurrogate,
    StaticRouter,
    TemperatureSchedule,
    budget_loss,
    expected_cost_tempered,
    sample_choices,
    widths_to_masks,
)

ROUTERS = ("static", "dynamic")
ROUTINGS = ("constrained", "argmax")
UPDATES = ("direct", "surrogate")


def _key(b: float) -> str:
    return f"{b:g}"


def _mkey(b: float) -> str:
    return "b" + _key(b).replace(".", "_")


class FlextronModule(L.LightningModule):
    """Elastic many-in-one LLM training (Flextron).

    Args:
        model: alias / Hub id / local dir of the parent model (``smollm2-135m-instruct`` ships offline).
        model_config: inline config for a randomly initialised parent (tests); used when ``model`` is None.
        tokenizer: tokenizer name (default: the model's; ``byt5`` for inline configs).
        budgets: trained budgets as fractions of the full cost (1.0 is the full model).
        budget_metric: ``params``, ``flops``, ``latency_prefill`` or ``latency_decode`` (measured on
            the training device at setup).
        mlp_ratios, attn_ratios: width choices per layer, as fractions of the full MLP / KV groups.
        mlp_multiple: round MLP widths to this many neurons (hardware-friendly shapes).
        router: ``static`` (budget -> widths) or ``dynamic`` (reads the input too).
        per_token: dynamic router only: route every token instead of every sequence.
        router_hidden: router hidden units.
        router_update: ``direct`` (loss through the masks) or ``surrogate`` (the paper's loss predictor).
        surrogate_threshold: relative error below which the surrogate starts steering the routers.
        loss: ``kd`` (KL to the frozen full model), ``lm``, or ``kd+lm``.
        kd_temperature: distillation temperature.
        budget_weight: weight of the budget loss.
        budget_tolerance: relative band around the budget with zero budget loss.
        full_prob: probability that a step trains the full model.
        interp_prob: probability that a routed step requests an in-between budget (drawn uniformly
            between the smallest and largest trained budget) so routers also learn the gaps.
        elastic_steps, router_steps: lengths of the first two stages (optimizer steps).
        elastic_sampling: sub-networks of the elastic stage: ``per_layer`` (each layer draws its own
            width) or ``uniform`` (one width for all layers: MatFormer-style nested training).
        tau_start, tau_end, tau_steps: Gumbel temperature schedule (``tau_steps`` None: router + joint
            stage length as estimated from the trainer).
        calibration_batches: training batches scored for importance (0: keep the original order).
        latency_seq_len, latency_reps: workload of the latency table.
        routing: how the static router's fixed sub-network for a budget is chosen at inference
            (validation ``val/realized_b*``, export): ``constrained`` (most probable widths whose cost
            stays within the budget, see :mod:`.constrained`) or ``argmax`` (each layer's argmax,
            which can overshoot the budget).
        routing_slack: constrained routing only: the chosen cost is at least ``1 - routing_slack``
            times the largest cost reachable under the budget (0: fill the budget as far as the widths
            allow; 1: most probable widths under the budget, however cheap).
        learning_rate, router_lr: peak LR of the LLM (warmup + cosine) and LR of routers/surrogate.
        weight_decay, warmup_steps, min_lr_ratio, grad_clip: LLM optimizer settings.
        seed: seeds the parent init (inline configs) and the per-step budget sampling.
    """

    def __init__(
        self,
        model: str | None = "smollm2-135m-instruct",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        budgets: Sequence[float] = (0.3, 0.5, 0.7, 0.9, 1.0),
        budget_metric: str = "params",
        mlp_ratios: Sequence[float] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
        attn_ratios: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
        mlp_multiple: int = 1,
        router: str = "static",
        per_token: bool = False,
        router_hidden: int = 128,
        router_update: str = "direct",
        surrogate_threshold: float = 0.05,
        loss: str = "kd",
        kd_temperature: float = 1.0,
        budget_weight: float = 1.0,
        budget_tolerance: float = 0.02,
        full_prob: float = 1 / 3,
        interp_prob: float = 0.0,
        elastic_steps: int = 0,
        elastic_sampling: str = "per_layer",
        router_steps: int = 20,
        tau_start: float = 1.0,
        tau_end: float = 0.1,
        tau_steps: int | None = None,
        calibration_batches: int = 8,
        latency_seq_len: int = 128,
        latency_reps: int = 5,
        routing: str = "constrained",
        routing_slack: float = 0.03,
        learning_rate: float = 1e-4,
        router_lr: float = 1e-2,
        weight_decay: float = 0.0,
        warmup_steps: int = 5,
        min_lr_ratio: float = 0.1,
        grad_clip: float | None = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for name, value, allowed in (("budget_metric", budget_metric, METRICS), ("router", router, ROUTERS),
                                     ("router_update", router_update, UPDATES), ("loss", loss, LOSSES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not budgets or any(not 0.0 < b <= 1.0 for b in budgets):
            raise ValueError(f"budgets must be fractions in (0, 1], got {list(budgets)}")
        if router == "dynamic" and router_update == "surrogate":
            raise ValueError("the loss surrogate scores one width choice per batch: use router_update='direct' "
                             "with router='dynamic'")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        if not 0.0 <= routing_slack <= 1.0:
            raise ValueError(f"routing_slack must be in [0, 1], got {routing_slack}")
        if elastic_sampling not in ("per_layer", "uniform"):
            raise ValueError(f"elastic_sampling must be 'per_layer' or 'uniform', got {elastic_sampling!r}")
        if not 0.0 <= full_prob <= 1.0:
            raise ValueError(f"full_prob must be in [0, 1], got {full_prob}")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = load_causal_lm(model, model_config=model_config, seed=seed)
        self.model.train()
        self.tokenizer = load_tokenizer(tokenizer or (model if model is not None else BYTE_TOKENIZER))
        self.elastic = ElasticLM(self.model)
        spec = self.elastic.spec
        self.space = WidthSpace.from_ratios(spec, mlp_ratios, attn_ratios, mlp_multiple)
        self.budgets = sorted(float(b) for b in budgets)
        L_, km, ka = spec.num_layers, len(self.space.mlp), len(self.space.attn)
        if router == "static":
            self.router = StaticRouter(self.budgets, L_, km, ka, router_hidden)
        else:
            self.router = DynamicRouter(spec.hidden_size, self.budgets, L_, km, ka, router_hidden, per_token)
        self.surrogate = LossSurrogate(L_ * (km + ka)) if router_update == "surrogate" else None
        self.register_buffer("mlp_unit_masks", self.space.unit_masks("mlp"), persistent=False)
        self.register_buffer("attn_unit_masks", self.space.unit_masks("attn"), persistent=False)
        self.cost: CostTable | None = None
        self.converted = False
        self._teacher: list[nn.Module] = []  # a list keeps the frozen copy out of state_dict / DDP
        self._val_subnets: dict[float, SubnetConfig] = {}  # static routing, fixed within a validation epoch
        # ModuleDict keys cannot hold ".": budget 0.5 is stored as "b0_5"
        self.val_losses = nn.ModuleDict({"full": MeanMetric(), **{_mkey(b): MeanMetric() for b in self.budgets}})

    # ------------------------------------------------------------------ setup
    @override
    def configure_model(self) -> None:
        """Shard the LLM under FSDP2; routers stay whole on every rank (read outside the LLM's forward)."""
        refuse_strategy(self, FSDPStrategy, "FlextronModule: FSDPStrategy (FSDP1) fails in backward on its repeated "
                        "sub-network forwards; use configs/trainer/fsdp2.yaml (ModelParallelStrategy), ddp or deepspeed")
        configure_sharding(self, shard=[self.model], replicate=[m for m in (self.router, self.surrogate) if m])

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.converted:
            self._convert()
        if self.cost is None:
            self._build_cost_table()
            self._warn_unreachable_budgets()
        if stage == "fit" and not self._teacher and "kd" in self.hparams.loss:
            teacher = copy.deepcopy(self.model).eval()
            teacher.requires_grad_(False)
            self._teacher.append(teacher)

    def _convert(self) -> None:
        """Sort neurons / KV groups by activation importance (identical on every rank)."""
        n = self.hparams.calibration_batches
        if n > 0:
            dm = self.trainer.datamodule if self.trainer is not None else None
            if dm is None:
                raise ValueError("importance calibration needs a datamodule: pass one to fit, or calibration_batches=0")
            scores = activation_importance(self.model, dm.train_dataloader(), max_batches=n)
            if self.trainer.world_size > 1:
                scores = {k: self.trainer.strategy.reduce(v.to(self.device), reduce_op="sum").cpu().double()
                          for k, v in scores.items()}
            sort_by_importance(self.model, scores)
        self.converted = True

    def _build_cost_table(self) -> None:
        metric = self.hparams.budget_metric
        table = None
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero or not metric.startswith("latency"):
            table = cost_table(self.elastic, self.space, metric, seq_len=self.hparams.latency_seq_len,
                               reps=self.hparams.latency_reps)
        if trainer is not None and trainer.world_size > 1 and metric.startswith("latency"):
            table = CostTable.from_dict(trainer.strategy.broadcast(table.to_dict() if table else None, src=0))
        self.cost = table

    def _warn_unreachable_budgets(self) -> None:
        floor = float(self.cost.fixed + self.cost.mlp[:, 0].sum() + self.cost.attn[:, 0].sum()) / self.cost.full
        low = [b for b in self.budgets if b < floor]
        if low:
            rank_zero_warn(
                f"budgets {low} are below the smallest reachable {self.hparams.budget_metric} fraction {floor:.3f} "
                "(narrowest width everywhere): validation reports the narrowest sub-network for them; add narrower mlp_ratios/attn_ratios "
                "or raise the budgets"
            )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["flextron"] = {"converted": self.converted, "cost_table": self.cost.to_dict() if self.cost else None}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("flextron", {})
        self.converted = bool(meta.get("converted", True))  # the saved weights are already permuted
        if meta.get("cost_table"):
            self.cost = CostTable.from_dict(meta["cost_table"])

    # ------------------------------------------------------------------ routing
    def stage_at(self, step: int) -> str:
        h = self.hparams
        if step < h.elastic_steps:
            return "elastic"
        return "router" if step < h.elastic_steps + h.router_steps else "joint"

    def tau(self, step: int) -> float:
        h = self.hparams
        steps = h.tau_steps
        if steps is None:
            total = int(self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 1000
            steps = max(1, total - h.elastic_steps)
        return TemperatureSchedule(h.tau_start, h.tau_end, steps)(step - h.elastic_steps)

    def router_logits(self, budget: float | Tensor, input_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Width logits ``[..., L, K]`` for ``budget`` (and the input, for the dynamic router)."""
        if isinstance(self.router, StaticRouter):
            return self.router(budget)
        if input_ids is None:
            raise ValueError("the dynamic router needs input_ids")
        emb = self.model.get_input_embeddings()(input_ids)
        return self.router(emb.detach(), budget)

    @torch.no_grad()
    def subnet_for_budget(self, budget: float, routing: str | None = None, clamp: bool = False) -> SubnetConfig:
        """The static router's sub-network for ``budget`` (inside the trained range).

        Args:
            budget: fraction of the full cost.
            routing: ``constrained`` or ``argmax`` (None: the ``routing`` hyperparameter).
            clamp: constrained routing only: for a budget below the narrowest sub-network, return the
                narrowest one (see :meth:`is_reachable`) instead of raising
                :class:`~.constrained.BudgetUnreachableError`.
        """
        if not isinstance(self.router, StaticRouter):
            raise ValueError("a fixed sub-network per budget needs the static router (the dynamic one routes per input)")
        routing = routing or self.hparams.get("routing", "constrained")
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {routing!r}")
        lm, la = self.router(budget)
        if routing == "argmax":
            return SubnetConfig.from_choices(self.space, lm.argmax(-1).tolist(), la.argmax(-1).tolist())
        if self.cost is None:
            raise ValueError("constrained routing needs the cost table: call setup() or load a checkpoint first")
        c = self.cost
        d = constrained_choices(lm.float().cpu(), la.float().cpu(), c.fixed, c.mlp, c.attn, budget * c.full,
                                slack=self.hparams.get("routing_slack", 0.03), clamp=clamp)
        return SubnetConfig.from_choices(self.space, d.mlp, d.attn)

    def is_reachable(self, budget: float) -> bool:
        """Whether some sub-network costs at most ``budget`` times the full cost."""
        c = self.cost
        return min_cost(c.fixed, c.mlp, c.attn) <= budget * c.full * (1 + RTOL)

    def realized(self, cfg: SubnetConfig) -> float:
        """Cost of ``cfg`` as a fraction of the full model's."""
        return self.cost.of(self.space, cfg) / self.cost.full

    # ------------------------------------------------------------------ training
    def _step_rng(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step)

    def _teacher_logits(self, input_ids: Tensor) -> Tensor | None:
        if not self._teacher:
            return None
        teacher = self._teacher[0]
        if next(teacher.parameters()).device != input_ids.device:
            teacher.to(input_ids.device)
        with torch.no_grad():
            return teacher(input_ids=input_ids, use_cache=False).logits

    def _forward_loss(self, batch: dict[str, Tensor], teacher: Tensor | None) -> Tensor:
        logits = self.model(input_ids=batch["input_ids"], use_cache=False).logits
        return task_loss(self.hparams.loss, logits, batch["labels"], teacher, self.hparams.kd_temperature)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        h = self.hparams
        opt = self.optimizers()
        sched = self.lr_schedulers()
        step = self.global_step
        stage = self.stage_at(step)
        gen = self._step_rng(step)
        u = torch.rand(3, generator=gen)
        ids = batch["input_ids"]
        bs = ids.shape[0]
        teacher = self._teacher_logits(ids) if "kd" in h.loss else None
        train_llm = stage != "router"
        logs: dict[str, Tensor | float] = {}

        # the router stage always routes: a full-model step there would train nothing (the LLM is frozen)
        if stage == "elastic" or (stage == "joint" and float(u[0]) < h.full_prob):
            # full model, or (elastic stage) a random nested sub-network with uniform per-layer choices
            cfg = None
            if stage == "elastic" and float(u[0]) >= h.full_prob:
                L_ = self.space.num_layers
                n = 1 if h.elastic_sampling == "uniform" else L_
                mi = torch.randint(len(self.space.mlp), (n,), generator=gen).expand(L_)
                if h.elastic_sampling == "uniform":  # attention follows the MLP ratio
                    frac = self.space.mlp[int(mi[0])] / self.space.mlp[-1]
                    ai = torch.full((L_,), min(range(len(self.space.attn)), key=lambda j: abs(
                        self.space.attn[j] / self.space.attn[-1] - frac)))
                else:
                    ai = torch.randint(len(self.space.attn), (L_,), generator=gen)
                cfg = SubnetConfig.from_choices(self.space, mi.tolist(), ai.tolist())
            with self.elastic.subnet(cfg):
                loss = self._forward_loss(batch, teacher)
            total = loss
            logs["train/budget"] = 1.0 if cfg is None else self.realized(cfg)
        else:
            if float(u[1]) < h.interp_prob:
                budget = self.budgets[0] + float(u[2]) * (self.budgets[-1] - self.budgets[0])
            else:
                budget = self.budgets[int(float(u[2]) * len(self.budgets)) % len(self.budgets)]
            tau = self.tau(step)
            lm_logits, la_logits = self.router_logits(budget, ids)
            pm = sample_choices(lm_logits, tau, True)
            pa = sample_choices(la_logits, tau, True)
            cost = expected_cost_tempered(self.cost, lm_logits, la_logits, tau)
            b_loss = budget_loss(cost, budget, self.cost.full, h.budget_tolerance).mean()
            logs.update({"train/tau": tau, "train/budget_requested": budget,
                         "train/budget_expected": (cost.mean() / self.cost.full).detach()})
            if h.router_update == "direct":
                self.elastic.set_masks(widths_to_masks(pm, self.mlp_unit_masks),
                                       widths_to_masks(pa, self.attn_unit_masks))
                try:
                    loss = self._forward_loss(batch, teacher)
                finally:
                    self.elastic.set_subnet(None)
                total = loss + h.budget_weight * b_loss
            else:
                cfg = SubnetConfig.from_choices(self.space, pm.argmax(-1).tolist(), pa.argmax(-1).tolist())
                with self.elastic.subnet(cfg), torch.set_grad_enabled(train_llm):
                    loss = self._forward_loss(batch, teacher)
                fit = self.surrogate.fit_loss(pm[None], pa[None], loss.detach()[None])
                ready = bool(self.surrogate.rel_error < h.surrogate_threshold)
                ready = self.trainer.strategy.reduce_boolean_decision(ready, all=True)
                # the routers learn only once the surrogate is trustworthy (paper, Fig. 3)
                router_obj = b_loss * 0.0
                if ready:
                    router_obj = h.budget_weight * b_loss + self.surrogate.predict_frozen(pm[None], pa[None]).mean()
                total = (loss if train_llm else loss.detach() * 0) + fit + router_obj
                logs["train/surrogate_rel_error"] = self.surrogate.rel_error
                logs["train/surrogate_ready"] = float(ready)
            logs["train/budget_loss"] = b_loss.detach()

        opt.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if not train_llm:  # router stage: the LLM stays frozen (AdamW skips parameters without grads)
            for p in self.model.parameters():
                p.grad = None
        if h.grad_clip:
            self.clip_gradients(opt, gradient_clip_val=h.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        sched.step()
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/stage", float(("elastic", "router", "joint").index(stage)), batch_size=bs)
        for k, v in logs.items():
            self.log(k, v, batch_size=bs)
        return total.detach()

    # ------------------------------------------------------------------ validation
    @override
    def on_validation_epoch_start(self) -> None:
        # the constrained decode takes up to ~1 s per budget at 30 layers: once per epoch, not per batch
        self._val_subnets = {}
        if isinstance(self.router, StaticRouter) and self.cost is not None:
            self._val_subnets = {b: self.subnet_for_budget(b, clamp=True) for b in self.budgets}

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        ids, labels = batch["input_ids"], batch["labels"]
        tokens = (labels[:, 1:] != -100).sum()
        with self.elastic.subnet(None):
            full = lm_loss(self.model(input_ids=ids, use_cache=False).logits, labels)
        self.val_losses["full"].update(full, weight=tokens)
        for b in self.budgets:
            if isinstance(self.router, StaticRouter):
                sub = self._val_subnets.get(b) or self.subnet_for_budget(b, clamp=True)
                with self.elastic.subnet(sub):
                    loss = lm_loss(self.model(input_ids=ids, use_cache=False).logits, labels)
            else:
                lm_, la_ = self.router_logits(b, ids)
                pm, pa = sample_choices(lm_, 1.0, False), sample_choices(la_, 1.0, False)
                self.elastic.set_masks(widths_to_masks(pm, self.mlp_unit_masks),
                                       widths_to_masks(pa, self.attn_unit_masks))
                try:
                    loss = lm_loss(self.model(input_ids=ids, use_cache=False).logits, labels)
                finally:
                    self.elastic.set_subnet(None)
                self.log(f"val/realized_b{_key(b)}", self.cost.expected(pm, pa).mean() / self.cost.full,
                         batch_size=ids.shape[0], sync_dist=True)
            self.val_losses[_mkey(b)].update(loss, weight=tokens)

    @override
    def on_validation_epoch_end(self) -> None:
        for key, metric in self.val_losses.items():
            if not metric.update_called:
                continue
            loss = metric.compute()
            with torch.inference_mode(False):
                metric.reset()
            name = "val/loss" if key == "full" else f"val/loss_b{key[1:].replace('_', '.')}"
            self.log(name, loss, prog_bar=key == "full")
            self.log(name.replace("loss", "ppl"), torch.exp(loss))
        if isinstance(self.router, StaticRouter) and self.cost is not None:
            self._report_widths()
        self._val_subnets = {}  # the routers train on: never reuse these choices

    def _report_widths(self) -> None:
        from common.run_outputs import log_image, log_table, run_directory

        rows, grid_m, grid_a = [], [], []
        for b in self.budgets:
            # an unreachable trained budget (warned about at setup) reports the narrowest sub-network
            cfg = self._val_subnets.get(b) or self.subnet_for_budget(b, clamp=True)
            real = self.realized(cfg)
            self.log(f"val/realized_b{_key(b)}", real)
            self.log(f"val/budget_error_b{_key(b)}", abs(real / b - 1))
            grid_m.append([m / self.elastic.spec.intermediate_size for m in cfg.mlp])
            grid_a.append([a / self.elastic.spec.num_groups for a in cfg.attn])
            rows += [[b, i, cfg.mlp[i], cfg.attn[i], real] for i in range(len(cfg.mlp))]
        if self._trainer is None or not self.trainer.is_global_zero or self.trainer.sanity_checking:
            return
        log_table(self.trainer, "flextron/widths", ["budget", "layer", "mlp_neurons", "attn_kv_groups", "realized"], rows)
        png = run_directory(self.trainer) / f"flextron_widths_step{self.global_step}.png"
        plot_width_heatmap(self.budgets, grid_m, grid_a, png)
        log_image(self.trainer, "flextron/widths_heatmap", png)

    # ------------------------------------------------------------------ optimizers
    @override
    def configure_optimizers(self) -> Any:
        """One AdamW over LLM and routers (so ``global_step`` counts batches): LLM groups follow warmup +
        cosine at ``learning_rate``, the router group keeps ``router_lr``."""
        h = self.hparams
        decay = [p for p in self.model.parameters() if p.ndim >= 2]
        no_decay = [p for p in self.model.parameters() if p.ndim < 2]
        router_params = list(self.router.parameters()) + (list(self.surrogate.parameters()) if self.surrogate else [])
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay, "lr": h.learning_rate},
             {"params": no_decay, "weight_decay": 0.0, "lr": h.learning_rate},
             {"params": router_params, "weight_decay": 0.0, "lr": h.router_lr}],
            betas=(0.9, 0.95),
        )
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else 1000

        def llm(s: int) -> float:
            return warmup_cosine(s, h.warmup_steps, max(1, total), h.min_lr_ratio)

        sched = LambdaLR(opt, [llm, llm, lambda s: 1.0])
        return [opt], [sched]


def plot_width_heatmap(budgets: Sequence[float], mlp: list[list[float]], attn: list[list[float]], path) -> None:
    """Two heat maps (MLP and attention width ratio per layer, one row per budget), written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from common.atomic import atomic_write_bytes

    fig, axes = plt.subplots(1, 2, figsize=(10, 0.5 * len(budgets) + 1.8))
    for ax, grid, title in ((axes[0], mlp, "MLP width"), (axes[1], attn, "attention width")):
        im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_yticks(range(len(budgets)), [f"{b:g}" for b in budgets])
        ax.set_xlabel("layer")
        ax.set_ylabel("budget")
        ax.set_title(title)
    fig.colorbar(im, ax=axes, fraction=0.03)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


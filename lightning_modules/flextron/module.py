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
trained on observed losses and steers the routers only once its error is below ``surrogate_threshold``
times the spread of the observed losses (scale-free: KD losses near 0.002 qualify as LM losses near 3 do).

Width choices may include 0 (``mlp_ratios``/``attn_ratios``): that sub-layer is skipped, which lets
routers reach budgets close to the fixed cost (embeddings, LM head). A trained budget that no
sub-network reaches is an error at setup.

Every rank samples the same budget each step (a generator seeded by the step), conversion scores are
summed over ranks before sorting, and the latency table is measured on rank zero and broadcast, so
all ranks hold the same permutation, table and schedule.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from typing_extensions import override

from common.errors import UserFacingError
from common.hf_loading import BYTE_TOKENIZER, load_causal_lm, load_tokenizer
from lightning_modules.param_groups import decay_split
from lightning_modules.schedules import warmup_cosine
from lightning_modules.sharding import clip_grad_norm, configure_sharding, require_fsdp1_unit

from .budgets import CostTable, cost_table
from .constrained import RTOL, constrained_choices, min_cost
from .elastic import ElasticLM, SubnetConfig, WidthSpace
from .importance import activation_importance, sort_by_importance
from .losses import task_loss
from .objectives import RoutingDraw, draw_routing, surrogate_fit_loss, surrogate_router_objective
from .plan import STAGES, StepPlan, plan_step, stage_at
from .routers import DynamicRouter, LossSurrogate, StaticRouter, TemperatureSchedule, widths_to_masks
from .settings import ROUTINGS, check_choice, check_settings
from .validation import FlextronValidation, metric_key


class FlextronModule(FlextronValidation):
    """Elastic many-in-one LLM training (Flextron).

    Args:
        model: alias / Hub id / local dir of the parent model (``smollm2-135m-instruct`` ships offline).
        model_config: inline config for a randomly initialised parent (tests); used when ``model`` is None.
        tokenizer: tokenizer name (default: the model's; ``byt5`` for inline configs).
        budgets: trained budgets as fractions of the full cost (1.0 is the full model).
        budget_metric: ``params``, ``flops``, ``latency_prefill`` or ``latency_decode`` (measured on
            the training device at setup).
        mlp_ratios, attn_ratios: width choices per layer, as fractions of the full MLP / KV groups; 0 skips
            that sub-layer (Llama family), which is what makes budgets near the fixed cost reachable.
        mlp_multiple: round MLP widths to this many neurons (hardware-friendly shapes).
        router: ``static`` (budget -> widths) or ``dynamic`` (reads the input too).
        per_token: dynamic router only: route every token instead of every sequence.
        router_hidden: router hidden units.
        router_update: ``direct`` (loss through the masks) or ``surrogate`` (the paper's loss predictor).
        surrogate_threshold: the surrogate steers the routers once its mean absolute error is below this
            fraction of the observed losses' spread (standard deviation; see :class:`~.routers.LossSurrogate`).
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
        mlp_ratios: Sequence[float] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0),
        attn_ratios: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
        mlp_multiple: int = 1,
        router: str = "static",
        per_token: bool = False,
        router_hidden: int = 128,
        router_update: str = "direct",
        surrogate_threshold: float = 0.5,
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
        check_settings(budgets=budgets, budget_metric=budget_metric, router=router, router_update=router_update,
                       loss=loss, routing=routing, routing_slack=routing_slack, elastic_sampling=elastic_sampling,
                       full_prob=full_prob, interp_prob=interp_prob)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.model = load_causal_lm(model, model_config=model_config, seed=seed)
        self.model.train()
        self.tokenizer = load_tokenizer(tokenizer or (model if model is not None else BYTE_TOKENIZER))
        self.elastic = ElasticLM(self.model)
        spec = self.elastic.spec
        self.space = WidthSpace.from_ratios(spec, mlp_ratios, attn_ratios, mlp_multiple)
        self.budgets = sorted(float(b) for b in budgets)
        num_layers, mlp_choices, attn_choices = spec.num_layers, len(self.space.mlp), len(self.space.attn)
        if router == "static":
            self.router = StaticRouter(self.budgets, num_layers, mlp_choices, attn_choices, router_hidden)
        else:
            self.router = DynamicRouter(spec.hidden_size, self.budgets, num_layers, mlp_choices, attn_choices,
                                        router_hidden, per_token)
        self.surrogate = (LossSurrogate(num_layers * (mlp_choices + attn_choices)) if router_update == "surrogate"
                          else None)
        self.register_buffer("mlp_unit_masks", self.space.unit_masks("mlp"), persistent=False)
        self.register_buffer("attn_unit_masks", self.space.unit_masks("attn"), persistent=False)
        self.cost: CostTable | None = None
        self.converted = False
        self._teacher: list[nn.Module] = []  # a list keeps the frozen copy out of state_dict / DDP
        self._val_subnets: dict[float, SubnetConfig] = {}  # static routing, fixed within a validation epoch
        # ModuleDict keys cannot hold ".": budget 0.5 is stored as "b0_5"
        self.val_losses = nn.ModuleDict({"full": MeanMetric(), **{metric_key(b): MeanMetric() for b in self.budgets}})

    # ------------------------------------------------------------------ setup
    @override
    def configure_model(self) -> None:
        """Shard the LLM under FSDP2 (FSDP1: Lightning wraps it); routers stay whole on every rank."""
        configure_sharding(self, shard=[self.model], replicate=[m for m in (self.router, self.surrogate) if m])

    @override
    def on_fit_start(self) -> None:
        require_fsdp1_unit(self, self.model)  # after wrapping: backward runs inside training_step

    @override
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self.converted:
            self._convert()
        if self.cost is None:
            self.build_cost_table()
        self._check_budgets_reachable()
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
                raise UserFacingError(
                    "importance calibration needs a datamodule: pass one to fit, or calibration_batches=0")
            scores = activation_importance(self.model, dm.train_dataloader(), max_batches=n)
            if self.trainer.world_size > 1:
                scores = {k: self.trainer.strategy.reduce(v.to(self.device), reduce_op="sum").cpu().double()
                          for k, v in scores.items()}
            sort_by_importance(self.model, scores)
        self.converted = True

    def build_cost_table(self) -> None:
        """Build the cost table of ``budget_metric`` (latency: measured on rank zero and broadcast).

        Setup calls it; a module restored from a checkpoint without a stored table (or a tool that
        wants a fresh measurement) calls it directly.
        """
        metric = self.hparams.budget_metric
        table = None
        trainer = self._trainer
        if trainer is None or trainer.is_global_zero or not metric.startswith("latency"):
            table = cost_table(self.elastic, self.space, metric, seq_len=self.hparams.latency_seq_len,
                               reps=self.hparams.latency_reps)
        if trainer is not None and trainer.world_size > 1 and metric.startswith("latency"):
            table = CostTable.from_dict(trainer.strategy.broadcast(table.to_dict() if table else None, src=0))
        self.cost = table

    def budget_floor(self) -> float:
        """The smallest reachable cost fraction: the narrowest width (or a skipped sub-layer) everywhere."""
        return min_cost(self.cost.fixed, self.cost.mlp, self.cost.attn) / self.cost.full

    def _check_budgets_reachable(self) -> None:
        """Refuse to train budgets no sub-network can meet: they would train the narrowest one under a false name."""
        low = [b for b in self.budgets if not self.is_reachable(b)]
        if low:
            raise UserFacingError(
                f"budgets {low} are below the smallest reachable {self.hparams.budget_metric} fraction "
                f"{self.budget_floor():.3f} (narrowest width everywhere): add narrower mlp_ratios/attn_ratios "
                "(0 skips a sub-layer) or raise the budgets")

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
        """``elastic``, ``router`` or ``joint`` at optimizer step ``step``."""
        return stage_at(step, self.hparams.elastic_steps, self.hparams.router_steps)

    def tau(self, step: int) -> float:
        """Gumbel temperature at ``step`` (decays over the routed stages)."""
        hp = self.hparams
        steps = hp.tau_steps
        if steps is None:
            total = int(self.trainer.max_steps) if self._trainer is not None and self.trainer.max_steps > 0 else 1000
            steps = max(1, total - hp.elastic_steps)
        return TemperatureSchedule(hp.tau_start, hp.tau_end, steps)(step - hp.elastic_steps)

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
            clamp: constrained routing only: a budget below the smallest trained one is routed with that
                budget's width distribution under the requested cost limit, and a budget below the
                narrowest sub-network (see :meth:`is_reachable`) gets the narrowest one, instead of
                raising :class:`~.constrained.BudgetUnreachableError` or a range error.
        """
        if not isinstance(self.router, StaticRouter):
            raise UserFacingError(
                "a fixed sub-network per budget needs the static router (the dynamic one routes per input)")
        routing = routing or self.hparams.get("routing", "constrained")
        check_choice("routing", routing, ROUTINGS)
        below_range = clamp and routing == "constrained" and budget < self.budgets[0]
        mlp_logits, attn_logits = self.router(self.budgets[0] if below_range else budget)
        if routing == "argmax":
            return SubnetConfig.from_choices(self.space, mlp_logits.argmax(-1).tolist(),
                                             attn_logits.argmax(-1).tolist())
        if self.cost is None:
            raise UserFacingError("constrained routing needs the cost table: call setup() or load a checkpoint first")
        table = self.cost
        decoded = constrained_choices(mlp_logits.float().cpu(), attn_logits.float().cpu(), table.fixed, table.mlp,
                                      table.attn, budget * table.full,
                                      slack=self.hparams.get("routing_slack", 0.03), clamp=clamp)
        return SubnetConfig.from_choices(self.space, decoded.mlp, decoded.attn)

    def is_reachable(self, budget: float) -> bool:
        """Whether some sub-network costs at most ``budget`` times the full cost."""
        table = self.cost
        return min_cost(table.fixed, table.mlp, table.attn) <= budget * table.full * (1 + RTOL)

    def realized(self, cfg: SubnetConfig) -> float:
        """Cost of ``cfg`` as a fraction of the full model's."""
        return self.cost.of(self.space, cfg) / self.cost.full

    # ------------------------------------------------------------------ training
    def _step_rng(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + step)

    def plan_step(self, step: int) -> StepPlan:
        """What optimizer step ``step`` trains (the same on every rank: the draws are seeded by the step)."""
        hp = self.hparams
        return plan_step(self.stage_at(step), self._step_rng(step), self.budgets, self.space, hp.full_prob,
                         hp.interp_prob, hp.elastic_sampling)

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

    def _masked_task_loss(self, batch: dict[str, Tensor], teacher: Tensor | None, routing: RoutingDraw) -> Tensor:
        """Task loss through soft width masks, so it reaches the router probabilities (direct update)."""
        self.elastic.set_masks(widths_to_masks(routing.mlp_choice, self.mlp_unit_masks),
                               widths_to_masks(routing.attn_choice, self.attn_unit_masks))
        try:
            return self._forward_loss(batch, teacher)
        finally:
            self.elastic.set_subnet(None)

    def _surrogate_ready(self) -> bool:
        ready = bool(self.surrogate.rel_error < self.hparams.surrogate_threshold)
        return self.trainer.strategy.reduce_boolean_decision(ready, all=True)

    def _routed_losses(self, batch: dict[str, Tensor], teacher: Tensor | None, plan: StepPlan,
                       logs: dict[str, Tensor | float]) -> tuple[Tensor, Tensor]:
        """Task loss and total objective of a step whose sub-network the routers choose."""
        hp = self.hparams
        tau = self.tau(self.global_step)
        mlp_logits, attn_logits = self.router_logits(plan.budget, batch["input_ids"])
        routing = draw_routing(mlp_logits, attn_logits, self.cost, plan.budget, tau, hp.budget_tolerance)
        logs.update({"train/tau": tau, "train/budget_requested": plan.budget,
                     "train/budget_expected": (routing.expected_cost.mean() / self.cost.full).detach(),
                     "train/budget_loss": routing.budget_loss.detach()})
        if hp.router_update == "direct":
            loss = self._masked_task_loss(batch, teacher, routing)
            return loss, loss + hp.budget_weight * routing.budget_loss
        subnet = SubnetConfig.from_choices(self.space, routing.mlp_choice.argmax(-1).tolist(),
                                           routing.attn_choice.argmax(-1).tolist())
        with self.elastic.subnet(subnet), torch.set_grad_enabled(plan.train_llm):
            loss = self._forward_loss(batch, teacher)
        fit = surrogate_fit_loss(self.surrogate, routing, loss)
        ready = self._surrogate_ready()
        router_objective = surrogate_router_objective(self.surrogate, routing, hp.budget_weight, ready)
        logs["train/surrogate_rel_error"] = self.surrogate.rel_error
        logs["train/surrogate_ready"] = float(ready)
        llm_objective = loss if plan.train_llm else loss.detach() * 0
        return loss, llm_objective + fit + router_objective

    def _optimizer_step(self, total: Tensor, train_llm: bool) -> None:
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if not train_llm:  # router stage: the LLM stays frozen (AdamW skips parameters without grads)
            for p in self.model.parameters():
                p.grad = None
        if self.hparams.grad_clip:
            clip_grad_norm(self, optimizer, self.hparams.grad_clip, shard=[self.model])
        optimizer.step()
        self.lr_schedulers().step()

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        plan = self.plan_step(self.global_step)
        teacher = self._teacher_logits(batch["input_ids"]) if "kd" in self.hparams.loss else None
        logs: dict[str, Tensor | float] = {}
        if plan.routed:
            loss, total = self._routed_losses(batch, teacher, plan, logs)
        else:
            with self.elastic.subnet(plan.subnet):
                loss = self._forward_loss(batch, teacher)
            total = loss
            logs["train/budget"] = 1.0 if plan.subnet is None else self.realized(plan.subnet)
        self._optimizer_step(total, plan.train_llm)
        batch_size = batch["input_ids"].shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=batch_size)
        self.log("train/stage", float(STAGES.index(plan.stage)), batch_size=batch_size)
        for key, value in logs.items():
            self.log(key, value, batch_size=batch_size)
        return total.detach()

    # ------------------------------------------------------------------ optimizers
    @override
    def configure_optimizers(self) -> Any:
        """One AdamW over LLM and routers (so ``global_step`` counts batches): LLM groups follow warmup +
        cosine at ``learning_rate``, the router group keeps ``router_lr``."""
        hp = self.hparams
        decay, no_decay = decay_split(self.model)
        router_params = list(self.router.parameters()) + (list(self.surrogate.parameters()) if self.surrogate else [])
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay, "lr": hp.learning_rate},
             {"params": no_decay, "weight_decay": 0.0, "lr": hp.learning_rate},
             {"params": router_params, "weight_decay": 0.0, "lr": hp.router_lr}],
            betas=(0.9, 0.95),
        )
        total = int(self.trainer.max_steps) if self.trainer.max_steps and self.trainer.max_steps > 0 else 1000

        def llm_lr(step: int) -> float:
            return warmup_cosine(step, hp.warmup_steps, max(1, total), hp.min_lr_ratio)

        scheduler = LambdaLR(optimizer, [llm_lr, llm_lr, lambda step: 1.0])
        return [optimizer], [scheduler]


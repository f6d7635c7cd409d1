"""The honesty/helpfulness LightningDataModule: trials of both paradigms for ``train.py test``.

The stimuli themselves are Lightning-free (``honesty_paradigms``, ``honesty_trials``, ``honesty_prompts``).
"""

from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader
from typing_extensions import override

from common.errors import UserFacingError
from datamodules.honesty_paradigms import DECISION_CONTEXTS
from datamodules.honesty_trials import FRAMINGS, Trial, signaling_trials, time_trials


class HonestyDataModule(L.LightningDataModule):
    """Trials of both paradigms under every requested condition, for ``train.py test``.

    Batches are plain lists of :class:`Trial`. Under DDP, Lightning's distributed sampler gives each
    rank its share; the probe gathers the records and drops the sampler's padding duplicates by
    ``trial_id``.

    Args:
        n_signaling: signaling scenarios (each is shown under every framing x cot); 0 to skip.
        n_time: telling-the-time scenarios (each under every framing x context x cot); 0 to skip.
        seed: seeds every scenario, option subset and option order.
        signaling_framings: any of belief / ambiguous / utility.
        time_framings: framings for the time paradigm (the paper varies the decision context there).
        time_contexts: any of regular / watch.
        cot: which of direct answer (false) and chain-of-thought (true) to run.
        n_options: signaling utterances shown per trial (at least one true and one false); null for
            all 30 (only with method loglik/generate: 30 options cannot be lettered).
        beta_listener: rationality of the literal listener used for U_R.
        batch_size: trials per test step.
    """

    def __init__(
        self,
        n_signaling: int = 12,
        n_time: int = 8,
        seed: int = 0,
        signaling_framings: list[str] = list(FRAMINGS),  # noqa: B006  (jsonargparse shows the default)
        time_framings: list[str] = ["ambiguous"],  # noqa: B006
        time_contexts: list[str] = list(DECISION_CONTEXTS),  # noqa: B006
        cot: list[bool] = [False, True],  # noqa: B006
        n_options: int | None = 6,
        beta_listener: float = 1.0,
        batch_size: int = 1,
    ) -> None:
        super().__init__()
        if n_signaling < 0 or n_time < 0 or n_signaling + n_time == 0:
            raise UserFacingError(
                f"need some trials: n_signaling={n_signaling}, n_time={n_time} (both >= 0, not both 0)"
            )
        if not cot:
            raise UserFacingError("cot must list at least one of false (direct) and true (chain-of-thought)")
        self.save_hyperparameters()
        self.trials: list[Trial] = self._build()

    def _build(self) -> list[Trial]:
        h = self.hparams
        trials: list[Trial] = []
        if h.n_signaling:
            trials += signaling_trials(
                h.n_signaling, h.seed, h.signaling_framings, h.cot, h.n_options, h.beta_listener
            )
        if h.n_time:
            trials += time_trials(h.n_time, h.seed, h.time_framings, h.time_contexts, h.cot)
        return trials

    @override
    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.trials, batch_size=self.hparams.batch_size, shuffle=False, collate_fn=list)

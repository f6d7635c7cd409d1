"""Honesty-vs-helpfulness probe (Liu et al., ICML 2024) on the RSA speaker model of Sumers et al.

``speaker_model`` is pure numpy; ``HonestyProbe`` (the LightningModule) is imported lazily so the
pure parts and the ``simulate`` command do not pay for importing Lightning and transformers.
"""

from typing import Any

__all__ = ["HonestyProbe"]


def __getattr__(name: str) -> Any:
    if name == "HonestyProbe":
        from lightning_modules.probes.honesty.probe import HonestyProbe

        return HonestyProbe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

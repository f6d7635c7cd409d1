"""Flextron: many-in-one elastic LLMs (Cai et al., ICML 2024).

Pure-torch pieces (conversion, elastic layers, budgets, routers, export) import no Lightning; the
training LightningModule lives in ``module.py``.
"""

from .arch import ArchSpec, arch_spec, layer_handles
from .elastic import ElasticLM, LayerState, SubnetConfig, WidthSpace, make_elastic
from .export import build_subnetwork, export_subnetwork
from .importance import activation_importance, permute_model, random_permutation, sort_by_importance

__all__ = [
    "ArchSpec", "ElasticLM", "LayerState", "SubnetConfig", "WidthSpace", "activation_importance", "build_subnetwork",
    "export_subnetwork", "arch_spec",
    "layer_handles", "make_elastic", "permute_model", "random_permutation", "sort_by_importance",
]

"""Pretrained models in and out: Hugging Face LLaMA, GPT-2 and ViT directories (``hf``), normjax's
own model directories and training workdirs (``native``)."""

from normjax.interop.hf import check_exportable, from_hf, hf_config, to_hf
from normjax.interop.native import load, read_params, save, source_config

__all__ = ["check_exportable", "from_hf", "hf_config", "load", "read_params", "save", "source_config",
           "to_hf"]

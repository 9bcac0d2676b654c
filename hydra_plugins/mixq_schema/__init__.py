"""Hydra discovers this module (``hydra_plugins`` namespace) before composing, in `mixq compose`
and in `dvc exp run` alike, so the structured schema ``mixq_schema`` validates ``conf/``."""

from mixq.config import register_schema

register_schema()

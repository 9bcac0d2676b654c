"""DVC stage measure-kl-merge: outputs/measure-shards/0..n-1/ -> outputs/sensitivity/ (the table,
CSV and heatmap, exactly as an unsharded measurement writes them)."""

from pathlib import Path

from mixq.log import setup_stage
from mixq.config import load_params
from mixq.sensitivity import write_table
from mixq.shard import merge_shards, read_shards

setup_stage()
shards = load_params().measure.shards
table = merge_shards(read_shards(Path("outputs/measure-shards"), shards), shards)
write_table(table, Path("outputs/sensitivity"))

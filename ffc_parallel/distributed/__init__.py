"""Process groups and collectives: start-up under any launcher, gathers with autograd."""
from .collectives import all_gather_table, all_reduce_, gather_rows
from .init import DistributedInfo, exit_distributed, get_rank, get_world_size, init_distributed

__all__ = ["DistributedInfo", "all_gather_table", "all_reduce_", "exit_distributed", "gather_rows",
           "get_rank", "get_world_size", "init_distributed"]

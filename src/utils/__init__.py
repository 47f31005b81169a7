from src.utils.pylogger import RankedLogger
from src.utils.utils import extras, instantiate_callbacks, instantiate_loggers, task_wrapper

__all__ = [
    "RankedLogger",
    "extras",
    "instantiate_callbacks",
    "instantiate_loggers",
    "task_wrapper",
]

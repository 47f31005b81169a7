from src.utils import resolvers  # noqa: F401  (registers the configs' ${per_stage:...})
from src.utils.pylogger import RankedLogger
from src.utils.utils import extras, instantiate_callbacks, instantiate_loggers, task_wrapper

__all__ = [
    "RankedLogger",
    "extras",
    "instantiate_callbacks",
    "instantiate_loggers",
    "task_wrapper",
]

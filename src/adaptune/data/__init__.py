"""Training data: files and formats to token examples, packing, collating."""

from .examples import *  # noqa: F401,F403

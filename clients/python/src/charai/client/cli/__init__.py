"""The ``charai`` command: submit image and voice tasks, follow them live, list, fetch and cancel.

Built for two audiences at once. People get a live progress bar and readable errors; scripts get
``--json`` lines, plain progress lines whenever stdout is not a terminal, and exit codes that say
how the task ended (see ``EXIT_CODES``), so ``charai image ... && next-step`` does the right thing.

The parts: exit codes (:mod:`.exits`), how tasks read as text (:mod:`.text`), printing and live
following (:mod:`.output`), tables (:mod:`.views`), the commands (:mod:`.commands`), the
argument parser (:mod:`.parser`), and running one command (:mod:`.program`, whose ``main`` is the
``charai`` console script).
"""

from charai.client.cli.exits import EXIT_CODES, CliError
from charai.client.cli.parser import build_parser, parse_args
from charai.client.cli.program import describe_error, main, run

__all__ = ["EXIT_CODES", "CliError", "build_parser", "describe_error", "main", "parse_args", "run"]

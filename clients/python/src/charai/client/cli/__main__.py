"""``python -m charai.client.cli``: the same as the ``charai`` command."""

from charai.client.cli.program import main

main()

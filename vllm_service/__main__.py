"""``python -m vllm_service``: the same command line as the ``vllm-service`` script (cli.py)."""

from .cli import main

raise SystemExit(main())

"""``python -m jaxmnist.train``: hands over to the train command."""

from jaxmnist.commands.train import main

raise SystemExit(main())

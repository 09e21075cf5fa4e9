"""``python -m jaxmnist.backprop``: hands over to the backprop command."""

from jaxmnist.commands.backprop import main

raise SystemExit(main())

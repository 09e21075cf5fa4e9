"""``python -m jaxmnist.predict``: hands over to the predict command."""

from jaxmnist.commands.predict import main

raise SystemExit(main())

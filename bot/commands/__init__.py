"""The /db command set: ``catalog.build_registry()`` puts every capability's commands on one
registry, in the order `/db help` lists them."""

"""ZOWarmUp on Flower (``pip install ".[flower]"``): the federated method of
:mod:`zowarmup.federated` as a Flower ServerApp + ClientApp, for the simulation engine and the
deployment engine (SuperLink + SuperNodes). See docs/flower.md.

- :mod:`.apps`: ``server_app`` / ``client_app`` (read the Flower run config), ``make_server_app`` /
  ``make_client_app`` (around a given RunConfig), :class:`~.apps.ZOWarmUpStrategy`,
  :class:`~.apps.FlowerTransport`, :func:`~.apps.write_app` (a Flower App folder).
- :mod:`.records`: protocol messages <-> Flower records, validated.
- :mod:`.local`: a SuperLink and SuperNodes on 127.0.0.1 as separate processes (tests, trying it).

Importing this package does not import flwr; its submodules do.
"""
__all__ = ["apps", "records", "local"]

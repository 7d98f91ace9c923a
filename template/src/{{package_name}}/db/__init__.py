"""The service's database runtime, managed by poolwise: `copier update` replaces these files.

Engine profile, sessions, the start-up guard, connection metrics and the data files they read
(topology.toml, database_limits.toml). Your code goes next to this package: models.py,
items.py and the module that serves requests (app.py, handler.py or job.py). To change what
a file here does, change the template (or its answers) and update, so the next release does
not merge over your edit.
"""

"""Readers for the deployment shapes the connection budget must understand or refuse by name.

Each module is a set of pure functions over parsed manifests (dicts, as PyYAML gives them) or
files, returning numbers or raising :class:`Refused`, whose message names the file, the field,
why the budget cannot use it and the fix:

- ``containers``: which containers of a pod template run the service's image, and which kinds
  run pods at all;
- ``environment``: a container's environment as Kubernetes builds it (envFrom, env, $(VAR)),
  refusing budget inputs that come from a Secret or cannot be resolved;
- ``processes``: server processes per pod, from command, args and environment;
- ``autoscaling``: the peak pod count of a workload, its autoscaler and its rollout strategy;
- ``helm``: charts rendered with Helm's own engine, Capabilities pinned.
"""

from poolwise.shapes.errors import Refused

__all__ = ["Refused"]

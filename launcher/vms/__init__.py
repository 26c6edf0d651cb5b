"""The VM backend's parts that run on the user's machine: SSH to the hosts (`ssh`), which hosts (`hosts`),
and the checks made before anything is written (`checks`). `launcher.backends.vms` puts them together."""

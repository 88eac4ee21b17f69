"""Run a stand-alone Python script inside a domain's container, as a user of its /etc.

What root in a container can do: `runc exec` puts the process into the container's
cgroups and namespaces, under its seccomp filter and capabilities, as root inside;
the script then becomes the user whose rights the shared sockets ask for (postfix
for the milter, vmail for the hook server), as a Postfix or Dovecot process there
would be.  Only the standard library and the host's /usr exist inside.
"""

from __future__ import annotations

import json

from mailfc.runtime.instance import Instance
from mailfc.runtime.lifecycle import Runtime

BECOME = """\
import os, pwd, sys
_user = pwd.getpwnam(sys.argv.pop(1))
os.setgroups([])
os.setgid(_user.pw_gid)
os.setuid(_user.pw_uid)
"""


async def run_inside(runtime: Runtime, instance: Instance, user: str, script: str,
                     *args: str) -> object:
    """The JSON the script printed last; AssertionError with its output when it failed."""
    code, text = await runtime.backend.exec(
        instance.name, ["/usr/bin/python3", "-c", BECOME + script, user, *args])
    assert code == 0, text
    return json.loads(text.splitlines()[-1])

"""`earthkamal-agent init [PATH]`: a commented .earthkamal.yml and what the rest needs."""

from __future__ import annotations

from pathlib import Path

from .config import REPO_FILE, template
from .errors import UserError

GUIDE = """\
Next, make sure the release has what the pipeline needs (all read from the tagged commit):

  config/deploy.yml   service, image, registry (server, username,
                      password: [KAMAL_REGISTRY_PASSWORD]) and builder.arch (the servers'
                      architecture, e.g. amd64) are required.
  .kamal/secrets      one line per secret, values from the environment the agent gives Kamal:
                        KAMAL_REGISTRY_PASSWORD=$KAMAL_REGISTRY_PASSWORD
  {builder}
  The image must carry the label Kamal checks:  LABEL service=<service>
  (or set add_service_label: true in .earthkamal.yml).

Then store the secrets in your OS keyring (never in files):
  earthkamal-agent secrets set KAMAL_REGISTRY_PASSWORD --repo {path}
and release:
  git add .earthkamal.yml && git commit -m "Release with earthkamal-agent" && git tag v0.1.0
"""

EARTHLY = ("Earthfile        a +docker target ending in SAVE IMAGE (pass ARG IMAGE and set "
           "earthly.image_arg: IMAGE,\n                      or set earthly.image to the name it "
           "saves).")
DOCKERFILE = "Dockerfile       built with BuildKit (no Earthfile found, so builder: dockerfile)."


def cli_init(path: str) -> int:
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise UserError(f"{root} is not a directory; pass the repo's path.")
    target = root / REPO_FILE
    if target.exists():
        print(f"{target} already exists; not overwriting it.")
    else:
        target.write_text(template())
        print(f"Wrote {target}.")
    builder = EARTHLY if (root / "Earthfile").exists() else DOCKERFILE
    print(GUIDE.format(builder=builder, path=root))
    return 0

"""The model registry: named, versioned models whose artifacts are content-addressed and sha256-verified.

Layout of the store (``$MEDCFX_HOME``, default ``~/.medcfx``)::

    registry.yaml                                  the user's entries (schema below)
    registry.lock                                  fcntl.flock target: every read-modify-write holds it
    objects/sha256/<hex[:2]>/<hex><suffix>         artifact bytes, named by their sha256 (suffix kept)

``registry.yaml`` (and the repository's read-only catalogue of BUNDLED models, same format, with artifact
paths relative to the catalogue's folder) looks like::

    schema: 1
    models:
    - name: sanchez-demo
      version: 1
      method: sanchez
      created: '2025-01-01T00:00:00Z'
      artifacts:
        weights: {path: objects/sha256/ab/ab12....safetensors, sha256: ab12..., bytes: 12345}
      config: {network: {...}, diffusion: {...}, preprocessing: {...}}
      provenance: {data_fingerprint: ..., steps: ..., seed: ..., medcfx_version: ..., git_commit: ...}
      metrics: {pixel_AUPRC: 0.61}
      tags: [demo]
      parent: other-model:2          # optional

Contract:

* A reference is ``name`` (latest version), ``name:VERSION`` or ``sha256:PREFIX`` (>= 6 hex digits of an
  entry's digest; the digest is the sha256 of its ``weights`` artifact, else of its first artifact).
* Every artifact is checked against its recorded size and sha256 before it is handed out or loaded.
* Versions of a name are 1 + the largest existing version of that name (user and bundled entries).
* registry.yaml and objects are written to a temporary file in the destination folder and moved into
  place with ``os.replace`` (atomic), so a reader never sees half a file; writers serialise on the lock.
* Every artifact path (user entries, the bundled catalogue, imported archives) and every file name an entry
  declares is confined to its folder by :func:`medcfx.registry.store.confine`: a path that leads
  elsewhere is an IntegrityError, never a file read, packed or written.
* Temporaries follow :mod:`medcfx.staging`; each write under the lock first sweeps those of dead writers.
* No pickle: weights are safetensors, everything else YAML (``yaml.safe_*``) or JSON.

Modules: :mod:`~medcfx.registry.entry` (the fields of an entry), :mod:`~medcfx.registry.store` (objects and
confinement), :mod:`~medcfx.registry.core` (the Registry), :mod:`~medcfx.registry.archive` (export/import).
"""

from medcfx.registry.core import Registry, bundled_catalogue_path, default_home
from medcfx.registry.entry import Entry, git_commit, human_bytes, replay_intensity_rule, validate_name
from medcfx.registry.store import sha256_file

__all__ = [
    "Entry",
    "Registry",
    "bundled_catalogue_path",
    "default_home",
    "git_commit",
    "human_bytes",
    "replay_intensity_rule",
    "sha256_file",
    "validate_name",
]

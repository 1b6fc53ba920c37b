"""How every command runs: absl flags, one-line errors, exit status 2.

A command module defines ``define_flags(fv)`` (its flags, on the
``FlagValues`` it is given) and ``main(fv, args) -> int | None`` (``args``:
the positional arguments). ``run(module)`` is its ``python -m`` and console
entry point; ``call(module, argv)`` runs it in this process on fresh flags
(tests, notebooks). Both end a user's mistake -- a bad flag, a missing or
broken config file, a ``UserError`` -- with one ``error: ...`` line on
stderr and status 2, before any long work; other exceptions keep their
traceback.
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import sys
import tempfile
from types import ModuleType
import uuid

from absl import app, flags

from tim_jax.core import paths
from tim_jax.core.errors import UserError

USAGE_ERROR = 2


def fail(message: str) -> int:
  """Prints ``error: message`` (one line) and returns the exit status."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  return USAGE_ERROR


def flag_error_message(error: flags.Error) -> str:
  """absl's message, with a config file's own error in place of the
  traceback ml_collections wraps it in."""
  text = str(error)
  if "Error whilst parsing config file" in text:
    flag = text.split(":", 1)[0]
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    return f"{flag}: {last.partition(': ')[2] or last}"
  return text


def parse(fv: flags.FlagValues, argv: Sequence[str]) -> list[str]:
  """Parses ``argv`` into ``fv``; raises UserError for a bad flag.
  ``--config=configs/X.py`` falls back to the installed package's configs
  when there is no such file here."""
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  argv = [
    f"--config={config_base.resolve_path(a[len('--config=') :])}"
    if a.startswith("--config=")
    else a
    for a in argv
  ]
  # ml_collections reads the --config.KEY overrides from sys.argv.
  saved, sys.argv = sys.argv, list(argv)
  try:
    return fv(list(argv))
  except flags.Error as e:
    raise UserError(flag_error_message(e)) from None
  except KeyError as e:  # ml_collections: an override of no such field.
    bad = [a for a in argv if a.startswith("--config.")]
    raise UserError(
      f"the config has no field {e.args[0]!r} (overrides: {' '.join(bad)})"
    ) from None
  except AttributeError as e:  # A config file without get_config().
    if "get_config" not in str(e):
      raise
    config = next((a for a in argv if a.startswith("--config=")), "--config")
    raise UserError(
      f"{config}: the file defines no get_config(arg) (see configs/t2i.py)"
    ) from None
  except SyntaxError as e:  # A config file that is not Python.
    raise UserError(
      f"--config: {e.filename}, line {e.lineno}: {e.msg}"
    ) from None
  finally:
    sys.argv = saved


def execute(
  module: ModuleType, fv: flags.FlagValues, args: Sequence[str]
) -> int:
  """``module.main(fv, args)``, with a user's mistake as one line."""
  try:
    return int(module.main(fv, list(args)) or 0)
  except UserError as e:
    return fail(str(e))
  except FileNotFoundError as e:  # A path the user gave is not there.
    return fail(f"{e.strerror}: {e.filename}" if e.filename else str(e))
  except (
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
  ) as e:
    if e.filename is None:  # Not about a path the user gave: a bug.
      raise
    return fail(f"{e.strerror}: {e.filename}")
  except Exception as e:  # pylint: disable=broad-except
    # Out of device memory: the sizes the user chose do not fit.
    if "RESOURCE_EXHAUSTED" not in str(e)[:200]:
      raise
    first = str(e).strip().splitlines()[0][:300]
    return fail(
      f"out of memory ({first}): lower the batch size (--batch_size, "
      "--config.batch_size) or the image size, or use more devices"
    )


def call(module: ModuleType, argv: Sequence[str] = ()) -> int:
  """Runs a command in this process on fresh flags; returns its status."""
  fv = flags.FlagValues()
  module.define_flags(fv)
  try:
    rest = parse(fv, [module.__name__, *argv])
  except UserError as e:
    return fail(str(e))
  return execute(module, fv, rest[1:])


class _QuietLibraries:
  """Keeps orbax's and grain's per-save INFO chatter out of the console."""

  def filter(self, record):
    noisy = "orbax" in record.pathname or "/grain/" in record.pathname
    return not (noisy and record.levelno < 30)


def run(module: ModuleType) -> None:
  """The command's process entry point (``python -m`` and console script):
  absl's app (logging, --helpfull) on the global flags."""
  import logging  # pylint: disable=g-import-not-at-top

  logging.getLogger("absl").addFilter(_QuietLibraries())
  fv = flags.FLAGS
  module.define_flags(fv)

  def parser(argv):
    try:
      return parse(fv, argv)
    except UserError as e:
      sys.exit(fail(str(e)))

  app.run(lambda argv: execute(module, fv, argv[1:]), flags_parser=parser)


def check_writable(path: str, flag: str) -> None:
  """Raises UserError unless a file can be written at ``path`` (its folder
  is created): checked before sampling, not after."""
  if paths.is_remote(path):  # A bucket: try a write next to it.
    if paths.as_path(path).is_dir():
      raise UserError(f"{flag}={path} is a directory; give a file name")
    probe = paths.as_path(path).parent / f".write_check-{uuid.uuid4().hex}"
    try:
      probe.write_bytes(b"")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except
      # The bucket's client raises its own errors besides OSError.
      raise UserError(f"cannot write {flag}={path}: {e}") from None
    return
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(os.path.abspath(path)):
    raise UserError(f"{flag}={path} is a directory; give a file name")
  try:
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=directory, prefix=".write_check"):
      pass
  except OSError as e:
    raise UserError(f"cannot write {flag}={path}: {e}") from None


# --- flags shared by the sampling commands -----------------------------------


def define_config(fv: flags.FlagValues, help_text: str) -> None:
  """``--config=FILE[:VARIANT]``, locked (unknown overrides are refused)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file(
    "config", None, help_text, flag_values=fv, lock_config=True
  )


def define_model_flags(fv: flags.FlagValues) -> None:
  """Where the model comes from: ``--model`` or ``--checkpoint``,
  ``--config`` and the frozen networks' files (paths or hub ids)."""
  define_config(
    fv,
    "Config file (+ ':variant'); optional for tim_jax "
    "checkpoints, which store theirs, and for --model.",
  )
  flags.DEFINE_string(
    "model",
    None,
    "A released model by name (tim-c2i-256, tim-c2i-512, tim-t2i): its "
    "weights, config, autoencoder and text encoder, from the Hugging Face "
    "Hub; the other model flags replace its parts.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "official_config",
    None,
    "Instead of --config: the official TiM YAML the checkpoint was "
    "trained with (e.g. configs/c2i/tim_xl_p2_256.yaml of the official "
    "repository), read as it is.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "checkpoint",
    None,
    "A tim_jax workdir, checkpoints "
    "dir or step dir, or an official .safetensors/.pt/"
    ".pth/.bin file; a local or gs:// path, or a hub id (hf://owner/repo/file).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "autoencoder_path",
    None,
    "The autoencoder's diffusers "
    "directory (latent models; replaces the config's "
    "autoencoder.path; a local or gs:// path, or a hub id: hf://owner/repo).",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "text_encoder_path",
    None,
    "The Gemma-3 directory of "
    "models trained on captions (replaces the config's "
    "text_encoder.path; a local or gs:// path, or a hub id: hf://owner/repo).",
    flag_values=fv,
  )


def define_sampler_flags(fv: flags.FlagValues, num_steps: int) -> None:
  """The sampler's settings; None means the config's ``sample.*``."""
  flags.DEFINE_integer(
    "num_steps",
    num_steps,
    "Sampling steps (NFE without guidance).",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_alias("steps", "num_steps", flag_values=fv)
  flags.DEFINE_float(
    "cfg_scale",
    None,
    "Guidance scale (default: the config's sample.cfg_scale; 1 = no guidance).",
    lower_bound=1.0,
    flag_values=fv,
  )
  flags.DEFINE_list(
    "guidance_interval",
    None,
    "low,high: guide where low*T_max < t < high*T_max (default: the config's).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "stochasticity",
    0.0,
    "OT-FM stochastic ratio.",
    lower_bound=0.0,
    flag_values=fv,
  )
  flags.DEFINE_enum(
    "mode",
    None,
    ["transition", "diffusion"],
    "Sampler mode (default: the config's sample.mode).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "T_max",
    None,
    "The time grid's start (default: the transport's T_max; the official "
    "scripts' --T-max).",
    flag_values=fv,
  )
  flags.DEFINE_float(
    "T_min",
    None,
    "The time grid's end (default: the transport's T_min; the official "
    "scripts' --T-min).",
    flag_values=fv,
  )
  flags.DEFINE_integer("seed", 0, "Noise seed.", flag_values=fv)
  flags.DEFINE_integer(
    "batch_size", 64, "Images per sampler call.", lower_bound=1, flag_values=fv
  )
  flags.DEFINE_integer(
    "height",
    None,
    "Image height in pixels (default: "
    "the config's sample.image_size, decoded); a multiple "
    "of the autoencoder's downsampling times the patch "
    "size.",
    lower_bound=1,
    flag_values=fv,
  )
  flags.DEFINE_integer(
    "width",
    None,
    "Image width in pixels (as --height).",
    lower_bound=1,
    flag_values=fv,
  )

  def two_numbers(value):
    if value is None:
      return True
    try:
      return len([float(v) for v in value]) == 2
    except ValueError:
      return False

  flags.register_validator(
    "guidance_interval",
    two_numbers,
    "must be two numbers low,high",
    flag_values=fv,
  )


def guidance_interval(fv: flags.FlagValues):
  """``--guidance_interval`` as (low, high), or None."""
  value = fv.guidance_interval
  return None if value is None else tuple(float(v) for v in value)


def load_pipeline(fv: flags.FlagValues):
  """The ``inference.Pipeline`` the model flags name."""
  from tim_jax import inference  # pylint: disable=g-import-not-at-top
  from tim_jax.config import config_base  # pylint: disable=g-import-not-at-top

  config = config_base.flag_config(fv)
  if fv.official_config:
    if config is not None:
      raise UserError("give --config or --official_config, not both")
    config = fv.official_config
  if fv.model:
    return inference.load_preset(
      fv.model,
      config=config,
      checkpoint=fv.checkpoint,
      autoencoder_path=fv.autoencoder_path,
      text_encoder_path=fv.text_encoder_path,
    )
  if not fv.checkpoint:
    raise UserError(
      "give --checkpoint=PATH (a run or an official file) or "
      "--model=NAME (a released model: tim-c2i-256, tim-c2i-512, tim-t2i)"
    )
  return inference.load(
    fv.checkpoint, config, fv.autoencoder_path, fv.text_encoder_path
  )


def lock_output(directory: str, what: str):
  """The job's lock on its output ``directory`` (one writer at a time; see
  ``tim_jax.core.workdir_lock``), agreed among a multi-process job's
  processes. A context manager."""
  import contextlib  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top

  from tim_jax.core import workdir_lock  # pylint: disable=g-import-not-at-top

  @contextlib.contextmanager
  def held():
    agree = None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top

      def agree(ok):
        return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))

    lock = workdir_lock.acquire(directory, what, jax.process_index(), agree)
    try:
      yield lock
    finally:
      if lock is not None:
        lock.release()

  return held()

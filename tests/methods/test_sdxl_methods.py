"""Which methods take an SDXL base: those whose registry entry says `sdxl`; the others (E4T,
InstantBooth, FastComposer: SD 1.x methods) stop with a one-line error naming the ones that do."""

import pytest

from persona_jax.cli import main
from persona_jax.errors import ConfigError
from persona_jax.methods.registry import METHODS, make_method

SD1_ONLY = ("blip_diffusion", "e4t", "fastcomposer", "instantbooth")


def test_registry_says_which_methods_train_on_sdxl():
  assert {n for n, s in METHODS.items() if not s.sdxl} == set(SD1_ONLY)


@pytest.mark.parametrize("name", SD1_ONLY)
def test_sd1_methods_on_sdxl_are_one_line_errors(name, sdxl_pipe):
  with pytest.raises(ConfigError, match=f"method.name: {name} trains on SD 1.x/2.x bases only and "
                                        "the model is SDXL; on SDXL use .*dreambooth") as e:
    make_method(name, {}, sdxl_pipe.params, sdxl_pipe.tokenizer_dir, sdxl_pipe.unet_config)
  assert "\n" not in str(e.value)


def test_train_command_refuses_an_sd1_method_on_sdxl(sdxl_dir, tmp_path, capsys):
  assert main(["train", "--config", "e4t_tune:tiny", "--workdir", str(tmp_path / "w"),
               f"--config.model={sdxl_dir}", "--config.steps=1"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "e4t trains on SD 1.x/2.x bases only" in err[0], err

"""Checkpoints without a chat template (Vicuna v1.5) train and decode with a built-in one."""

import json

import pytest

from fspad_jax import data as data_lib
from fspad_jax.config import ConfigError
from fspad_jax.hf_checkpoint import load_tokenizer
from fspad_jax.tiny_checkpoint import build_tokenizer


@pytest.fixture(scope="module")
def bare_tokenizer_dir(tmp_path_factory):
  """A tokenizer saved without a chat template (like lmsys/vicuna-7b-v1.5)."""
  d = tmp_path_factory.mktemp("bare")
  tok = build_tokenizer(str(d), vocab_size=400)
  tok.chat_template = None
  (d / "chat_template.jinja").unlink(missing_ok=True)
  config = json.loads((d / "tokenizer_config.json").read_text())
  config.pop("chat_template", None)
  (d / "tokenizer_config.json").write_text(json.dumps(config))
  assert not load_tokenizer(str(d)).chat_template
  return str(d)


def test_vicuna_template_renders_fastchat_format(bare_tokenizer_dir):
  tok = load_tokenizer(bare_tokenizer_dir, "vicuna_v1.1")
  text = tok.apply_chat_template(
      [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
       {"role": "user", "content": "Bye"}], add_generation_prompt=True, tokenize=False)
  assert text == (tok.bos_token + "A chat between a curious user and an artificial "
                  "intelligence assistant. The assistant gives helpful, detailed, and polite "
                  "answers to the user's questions. USER: Hi ASSISTANT: Hello!"
                  + tok.eos_token + "USER: Bye ASSISTANT:")


def test_unknown_template_name_is_refused(bare_tokenizer_dir):
  with pytest.raises(ConfigError, match="not a known name"):
    load_tokenizer(bare_tokenizer_dir, "chatml_typo")


def test_data_preparation_needs_and_uses_a_template(bare_tokenizer_dir, tmp_path):
  conv = tmp_path / "c.jsonl"
  conv.write_text("\n".join(json.dumps({"id": f"r{i}", "conversations": [
      {"from": "human", "value": f"Question {i}?"},
      {"from": "gpt", "value": f"Answer number {i}."}]}) for i in range(20)))
  with pytest.raises(data_lib.DataError, match="has no chat template"):
    data_lib.prepare_dataset(str(conv), bare_tokenizer_dir, 256, str(tmp_path / "p"))
  builder_dir, report = data_lib.prepare_dataset(str(conv), bare_tokenizer_dir, 256,
                                                 str(tmp_path / "p"), val_fraction=0.0,
                                                 chat_template="vicuna_v1.1")
  assert report["train"] == 20 and not report["bad"]
  batch = next(iter(data_lib.TrainBatches(builder_dir, "train", 20, shuffle=False,
                                          num_epochs=1, shard_index=0, shard_count=1)))
  tok = load_tokenizer(bare_tokenizer_dir, "vicuna_v1.1")
  for ids, mask in zip(batch["input_ids"], batch["loss_mask"]):
    answer = tok.decode(ids[mask > 0])
    assert answer.startswith("Answer number") and answer.endswith(tok.eos_token), answer

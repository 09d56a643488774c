"""Pretrained Hugging Face models without `transformers`: what `transformers`, `tokenizers`, `safetensors` and
`huggingface_hub` would otherwise give the two training scripts, one idea per file:

  files.py      config.json, safetensors (read and write), sharded indexes, pytorch_model.bin, strict loading
  hub.py        resolve("FacebookAI/roberta-base") -> a local folder: download once, resumable, verified, cached
  tokenizer.py  Tokenizer.from_pretrained(folder): tokenizer.json read exactly as `tokenizers` reads it
  encoder.py    BERT / RoBERTa returning hidden states                  (Encoder.from_pretrained)
  decoder.py    Llama / Mistral / Qwen2 / SmolLM / Gemma with a KV cache (CausalLM.from_pretrained)
  nf4.py        NF4Linear: QLoRA's 4-bit NormalFloat weights in pure torch (CausalLM.from_pretrained(quantize="nf4"))
  peft.py       save_peft_lora: a trained adapter as a PEFT LoRA folder for the transformers model

Module and parameter names are Hugging Face's, so adapters target the usual names and exported weights line up.
The method itself is in ../unilora.py, which imports nothing from here.
"""
from .decoder import CausalLM, KVCache
from .encoder import Encoder
from .files import load_config, load_safetensors, load_state_dict, read_json, save_safetensors, write_json
from .hub import download, resolve
from .peft import save_peft_lora
from .tokenizer import Encoding, Tokenizer, pad

__all__ = ["CausalLM", "KVCache", "Encoder", "Encoding", "Tokenizer", "pad", "resolve", "download", "load_config",
           "load_safetensors", "load_state_dict", "read_json", "save_safetensors", "write_json", "save_peft_lora"]

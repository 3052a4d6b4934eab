"""Tiny checkpoints made with transformers' own classes (random init, save_pretrained), so the
compiler meets real tensor names and layouts; and a small real BPE tokenizer to go with them."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A mixture of experts routes every token to a few of its experts.",
    "Small devices have little memory, so experts are loaded when they are needed.",
    "Hello, world! Numbers like 12345 and symbols like @#$% appear too.",
    "Once upon a time there was a tiny language model that ran on a phone.",
]
VOCAB = 320
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def save_tokenizer(out: Path, chat_template: bool = False) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}
    if chat_template:
        config["chat_template"] = CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config))


COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.1, eos_token_id=0, bos_token_id=0,
              tie_word_embeddings=False)


def mixtral_config(**overrides):
    from transformers import MixtralConfig

    return MixtralConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3,
                            "num_local_experts": 8, "num_experts_per_tok": 2, **overrides})


def qwen2_moe_config(**overrides):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32,
                             "shared_expert_intermediate_size": 48, "num_hidden_layers": 4,
                             "num_experts": 12, "num_experts_per_tok": 4, "norm_topk_prob": False,
                             "decoder_sparse_step": 1, "mlp_only_layers": [], **overrides})


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "head_dim": 32,
                             "num_hidden_layers": 4, "num_experts": 12, "num_experts_per_tok": 4,
                             "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [], **overrides})


def olmoe_config(**overrides):
    from transformers import OlmoeConfig

    return OlmoeConfig(**{**COMMON, "intermediate_size": 32, "num_hidden_layers": 3, "num_experts": 16,
                          "num_experts_per_tok": 4, "norm_topk_prob": False, "num_key_value_heads": 4,
                          **overrides})


def granitemoe_config(**overrides):
    from transformers import GraniteMoeConfig

    # multipliers of the size Granite 3.0 uses
    return GraniteMoeConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3, "num_local_experts": 8,
                               "num_experts_per_tok": 2, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                               "attention_multiplier": 0.03, "logits_scaling": 6.0, **overrides})


def granitemoeshared_config(**overrides):
    from transformers import GraniteMoeSharedConfig

    return GraniteMoeSharedConfig(**{**COMMON, "intermediate_size": 48, "shared_intermediate_size": 40,
                                     "num_hidden_layers": 3, "num_local_experts": 8, "num_experts_per_tok": 2,
                                     "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                     "attention_multiplier": 0.03, "logits_scaling": 6.0, **overrides})


def granitemoe_swa_config(**overrides):
    from transformers import GraniteMoeSWAConfig

    # a window shorter than the parity prompt + decode; layer 0 full, the others sliding (the default rule)
    return GraniteMoeSWAConfig(**{**COMMON, "intermediate_size": 48, "shared_intermediate_size": 40,
                                  "num_hidden_layers": 3, "num_local_experts": 8, "num_experts_per_tok": 2,
                                  "sliding_window": 6, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                  "attention_multiplier": 0.03, "logits_scaling": 6.0, **overrides})


def phimoe_config(**overrides):
    from transformers import PhimoeConfig

    return PhimoeConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3, "num_local_experts": 8,
                           "num_experts_per_tok": 2, "attention_bias": True, "lm_head_bias": True, **overrides})


def deepseek_v2_config(**overrides):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                               "num_key_value_heads": 4, "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                               "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                               "v_head_dim": 16, "routed_scaling_factor": 1.5, **overrides})


def deepseek_v3_config(**overrides):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                               "num_key_value_heads": 4, "n_routed_experts": 16, "num_experts_per_tok": 4,
                               "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                               "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                               "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                               **overrides})


def glm4_moe_config(**overrides):
    from transformers import Glm4MoeConfig

    # GLM-4.5's shape in miniature: half the head rotated, q/k/v biases, sigmoid routing over groups
    # with a correction bias, one shared expert, the first layer dense; no MTP layer
    return Glm4MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                            "head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                            "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                            "routed_scaling_factor": 2.5, "attention_bias": True, "use_qk_norm": False,
                            "partial_rotary_factor": 0.5, "num_nextn_predict_layers": 0, **overrides})


def param2moe_config(**overrides):
    from transformers import Param2MoeConfig

    # GLM-4.5's block as Param2 ships it: rotary over the whole head, q/k norms, two shared experts
    return Param2MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                              "head_dim": 16, "n_routed_experts": 12, "num_experts_per_tok": 3, "n_shared_experts": 2,
                              "first_k_dense_replace": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                              "tie_word_embeddings": False, **overrides})


def sarvam_moe_config(**overrides):
    from transformers import SarvamMoEConfig

    return SarvamMoEConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                              "head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                              "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "attention_bias": True,
                              "tie_word_embeddings": False, **overrides})


def minicpm5_moe_config(**overrides):
    from transformers import MiniCPM5MoeConfig

    # q_proj yields each head's query and output gate; sigmoid routing over groups; a dense first layer
    return MiniCPM5MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                                "head_dim": 16, "n_routed_experts": 12, "num_experts_per_tok": 3,
                                "n_shared_experts": 1, "n_group": 3, "topk_group": 2, "norm_topk_prob": True,
                                "routed_scaling_factor": 2.5, "mlp_layer_types": ["dense", "sparse", "sparse"],
                                "tie_word_embeddings": False, **overrides})


def mistral4_config(**overrides):
    from transformers import Mistral4Config

    # latent attention under YaRN with Llama-4's query scaling (1 within the original context), softmax routing
    # over groups ranked by their two best, a dense first layer
    rope = {"type": "yarn", "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": 512, "max_position_embeddings": 2048, "beta_fast": 32.0,
            "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
    return Mistral4Config(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                             "num_key_value_heads": 4, "n_routed_experts": 12, "num_experts_per_tok": 3,
                             "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32, "q_lora_rank": 24,
                             "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 4,
                             "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 1.5,
                             "max_position_embeddings": 2048, "rope_parameters": rope, **overrides})


# DeepSeek-V3.2's latent attention and indexer in miniature; the indexer keeps 64 keys, within which the
# attention is dense (Fate's context is capped there)
DSA = {**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_key_value_heads": 4,
       "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "kv_lora_rank": 32, "q_lora_rank": 24,
       "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 4, "topk_group": 2,
       "norm_topk_prob": True, "routed_scaling_factor": 2.5, "index_topk": 64, "index_n_heads": 2, "index_head_dim": 16}


def deepseek_v32_config(**overrides):
    from transformers import DeepseekV32Config

    return DeepseekV32Config(**{**DSA, "mlp_layer_types": ["dense", "sparse", "sparse"], **overrides})


def glm_moe_dsa_config(**overrides):
    from transformers import GlmMoeDsaConfig

    # the same in GLM's layout; the second indexer layer reuses the first's choice
    return GlmMoeDsaConfig(**{**DSA, "first_k_dense_replace": 1, "indexer_types": ["full", "shared", "full"],
                              **overrides})


def llama4_text_config(**overrides):
    from transformers import Llama4TextConfig

    # one expert a token on its router-scaled input beside a shared expert, a dense layer between MoE ones,
    # adjacent-pair RoPE with weightless q/k norms, a layer without positions (the fourth); chunks and the
    # NoPE query scale of 32 and 48 positions, within which both are identities (Fate caps the context)
    return Llama4TextConfig(**{**COMMON, "intermediate_size": 32, "intermediate_size_mlp": 96, "num_hidden_layers": 4,
                               "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 1,
                               "interleave_moe_layer_step": 2, "attention_chunk_size": 32, "floor_scale": 48,
                               "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, **overrides})


def llama4_config(**overrides):
    """The multimodal checkpoint as released: the language model beside a small vision tower."""
    from transformers import Llama4Config

    vision = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=28,
                  patch_size=14, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)
    return Llama4Config(text_config=llama4_text_config(**overrides).to_dict(), vision_config=vision)


def minimax_config(**overrides):
    from transformers import MiniMaxConfig

    # lightning attention layers around a softmax one, blocks of 4 tokens in the lightning layers' prefill
    # (Fate runs their recurrence), each block added to its normed input with factors of its kind
    return MiniMaxConfig(**{**COMMON, "intermediate_size": 32, "num_hidden_layers": 4, "head_dim": 16,
                            "num_local_experts": 8, "num_experts_per_tok": 2, "block_size": 4,
                            "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                            "linear_attention"],
                            "full_attn_alpha_factor": 1.5, "full_attn_beta_factor": 0.75,
                            "linear_attn_alpha_factor": 0.5, "linear_attn_beta_factor": 1.25,
                            "mlp_alpha_factor": 1.25, "mlp_beta_factor": 0.8, **overrides})


def kimi_linear_config(**overrides):
    from transformers import KimiLinearConfig

    # Kimi Delta Attention around a latent attention layer without positions, sigmoid routing over groups
    # with a shared expert, a dense first layer
    return KimiLinearConfig(**{**COMMON, "pad_token_id": None, "num_key_value_heads": 4, "intermediate_size": 96,
                               "moe_intermediate_size": 32,
                               "num_hidden_layers": 3, "num_local_experts": 8, "num_experts_per_tok": 2,
                               "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.0,
                               "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                               "v_head_dim": 16, "linear_head_dim": 16, "linear_num_heads": 4,
                               "layer_types": ["linear_attention", "full_attention", "linear_attention"],
                               "mlp_layer_types": ["dense", "sparse", "sparse"], **overrides})


def mimo_v2_flash_config(**overrides):
    from transformers import MiMoV2FlashConfig

    # full layers around sliding ones that cache twice the key-value heads, learn sinks and rotate with their
    # own base (a window shorter than the parity prompt), value heads smaller than the keys and scaled, a
    # third of each head rotated (3 pairs of 16), a dense first layer, sigmoid routing over groups
    return MiMoV2FlashConfig(**{**COMMON, "num_key_value_heads": 1, "head_dim": 16, "v_head_dim": 12,
                                "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
                                "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
                                "routed_scaling_factor": 1.5, "attention_value_scale": 0.6, "sliding_window": 5,
                                "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                                                "full_attention"], **overrides})


def nemotron_h_config(**overrides):
    from transformers import NemotronHConfig

    # blocks of one thing each: Mamba2, MoE, attention without positions, a dense MLP, MoE (every MLP a
    # non-gated squared ReLU); sigmoid routing over groups with a shared expert
    return NemotronHConfig(**{**COMMON, "head_dim": 16, "intermediate_size": 48, "moe_intermediate_size": 32,
                              "moe_shared_expert_intermediate_size": 24, "n_routed_experts": 8,
                              "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 1.5,
                              "mamba_num_heads": 8, "mamba_head_dim": 8, "ssm_state_size": 16, "n_groups": 2,
                              "layers_block_type": ["linear_attention", "moe", "full_attention", "mlp", "moe"],
                              **overrides})


def sarvam_mla_config(**overrides):
    from transformers import SarvamMLAConfig

    return SarvamMLAConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                              "num_key_value_heads": 4, "n_routed_experts": 16, "num_experts_per_tok": 4,
                              "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 32,
                              "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                              "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
                              **overrides})


def dots1_config(**overrides):
    from transformers import Dots1Config

    # the last layer slides over a window shorter than the parity prompt + decode
    return Dots1Config(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                          "head_dim": 16, "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1,
                          "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
                          "routed_scaling_factor": 2.0, "attention_bias": True, "sliding_window": 6,
                          "max_window_layers": 2, **overrides})


def ernie4_5_moe_config(**overrides):
    from transformers import Ernie4_5_MoeConfig

    return Ernie4_5_MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                                 "moe_num_experts": 12, "moe_k": 3, "moe_num_shared_experts": 1,
                                 "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
                                 **overrides})


def glm4_moe_lite_config(**overrides):
    from transformers import Glm4MoeLiteConfig

    return Glm4MoeLiteConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
                                "num_key_value_heads": 4, "n_routed_experts": 16, "num_experts_per_tok": 4,
                                "n_shared_experts": 1, "kv_lora_rank": 32, "q_lora_rank": 24, "qk_nope_head_dim": 16,
                                "qk_rope_head_dim": 8, "v_head_dim": 16, "n_group": 4, "topk_group": 2,
                                "routed_scaling_factor": 1.8, "mlp_layer_types": ["dense", "sparse", "sparse"],
                                **overrides})


def solar_open_config(**overrides):
    from transformers import SolarOpenConfig

    return SolarOpenConfig(**{**COMMON, "moe_intermediate_size": 32, "num_hidden_layers": 3, "head_dim": 16,
                              "n_routed_experts": 16, "num_experts_per_tok": 4, "n_shared_experts": 1, "n_group": 4,
                              "topk_group": 2, "routed_scaling_factor": 2.0, "attention_bias": True, **overrides})


def gpt_oss_config(**overrides):
    from transformers import GptOssConfig

    # a window shorter than the parity prompt + decode, so the sliding layers differ from full ones
    return GptOssConfig(**{**COMMON, "intermediate_size": 32, "num_hidden_layers": 4, "num_local_experts": 8,
                           "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 6,
                           "layer_types": ["sliding_attention", "full_attention"] * 2,
                           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, **overrides})


def lfm2_moe_config(**overrides):
    from transformers import Lfm2MoeConfig

    # a hybrid: short-convolution layers around one attention layer, a dense first layer
    return Lfm2MoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
                            "num_experts": 8, "num_experts_per_tok": 2, "num_dense_layers": 1,
                            "layer_types": ["conv", "full_attention", "conv", "conv"], "routed_scaling_factor": 1.5,
                            **overrides})


def qwen3_next_config(**overrides):
    from transformers import Qwen3NextConfig

    # a hybrid: gated DeltaNet layers around a gated attention layer, 2 key heads for 4 value heads
    return Qwen3NextConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32,
                              "shared_expert_intermediate_size": 48, "num_hidden_layers": 4, "head_dim": 16,
                              "num_experts": 8, "num_experts_per_tok": 2, "linear_num_key_heads": 2,
                              "linear_num_value_heads": 4, "linear_key_head_dim": 16, "linear_value_head_dim": 8,
                              "linear_conv_kernel_dim": 4,
                              "layer_types": ["linear_attention", "linear_attention", "full_attention",
                                              "linear_attention"], **overrides})


QWEN3_5_TEXT = dict(intermediate_size=None, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                    num_hidden_layers=4, head_dim=16, num_experts=8, num_experts_per_tok=2, linear_num_key_heads=2,
                    linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])


def qwen3_5_moe_text_config(**overrides):
    from transformers import Qwen3_5MoeTextConfig

    text = {**COMMON, **QWEN3_5_TEXT, **overrides}
    text.pop("intermediate_size")
    return Qwen3_5MoeTextConfig(**text)


def qwen3_5_moe_config(**overrides):
    """The multimodal checkpoint as released: the language model under a small vision tower."""
    from transformers import Qwen3_5MoeConfig

    text = {**COMMON, **QWEN3_5_TEXT, **overrides}
    text.pop("intermediate_size")
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64)
    return Qwen3_5MoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def granitemoehybrid_config(**overrides):
    from transformers import GraniteMoeHybridConfig

    # a hybrid: Mamba2 layers (8 heads in 2 groups) around an attention layer, Granite's multipliers
    return GraniteMoeHybridConfig(**{**COMMON, "intermediate_size": 48, "shared_intermediate_size": 40,
                                     "num_hidden_layers": 4, "num_local_experts": 8, "num_experts_per_tok": 2,
                                     "layer_types": ["mamba", "attention", "mamba", "mamba"], "mamba_n_heads": 8,
                                     "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2,
                                     "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                     "attention_multiplier": 0.03, "logits_scaling": 6.0, **overrides})


def jamba_config(**overrides):
    from transformers import JambaConfig

    # a hybrid: Mamba layers around an attention layer (period 4, offset 1), MoE every other layer
    return JambaConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 4, "num_experts": 8,
                          "num_experts_per_tok": 2, "attn_layer_period": 4, "attn_layer_offset": 1,
                          "expert_layer_period": 2, "expert_layer_offset": 1, "mamba_d_state": 8, "mamba_d_conv": 4,
                          "mamba_expand": 2, "mamba_dt_rank": 8, **overrides})


def hunyuan_v1_moe_config(**overrides):
    from transformers import HunYuanMoEV1Config

    # q/k norms after RoPE; RoPE as checkpoints ship it ("dynamic" with a fixed alpha)
    return HunYuanMoEV1Config(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3, "num_experts": 8,
                                 "moe_topk": 2, "head_dim": 16, "attention_bias": True, "rope_parameters": {
                                     "rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0, "rope_theta": 10000.0},
                                 **overrides})


def minimax_m2_config(**overrides):
    from transformers import MiniMaxM2Config

    # q/k norms over whole projections, half of each head rotated (rotary_dim), sigmoid routing with a bias
    return MiniMaxM2Config(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3, "num_local_experts": 8,
                              "num_experts_per_tok": 2, "head_dim": 16, "rotary_dim": 8, **overrides})


def dbrx_config(**overrides):
    from transformers import DbrxConfig

    # fused q/k/v clamped, LayerNorm without bias, experts stacked as [E * I, H]
    return DbrxConfig(**{"vocab_size": VOCAB, "d_model": 64, "n_heads": 4, "n_layers": 3, "max_seq_len": 256,
                         "initializer_range": 0.1, "tie_word_embeddings": False,
                         "attn_config": {"kv_n_heads": 2, "clip_qkv": 0.8, "rope_theta": 10000.0},
                         "ffn_config": {"ffn_hidden_size": 48, "moe_num_experts": 8, "moe_top_k": 2}, **overrides})


def exaone_moe_config(**overrides):
    from transformers import ExaoneMoeConfig

    # sliding layers rotate, global ones use no positions; sigmoid grouped routing, a dense first layer
    return ExaoneMoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
                              "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 6,
                              "sliding_window_pattern": 2, "n_group": 2, "topk_group": 1, **overrides})


def cohere2_moe_config(**overrides):
    from transformers import Cohere2MoeConfig

    # parallel blocks, RoPE on pairs for sliding and dense-prefix layers only, shared experts averaged in
    return Cohere2MoeConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 4, "num_experts": 8,
                               "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 6, "sliding_window_pattern": 2,
                               "num_shared_experts": 1, "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
                               "prefix_dense_intermediate_size": 96, "logit_scale": 0.25, **overrides})


def flex_olmo_config(**overrides):
    from transformers import FlexOlmoConfig

    # post-norm layers: no norm before attention or MoE, their outputs normalized before the residual add
    return FlexOlmoConfig(**{**COMMON, "intermediate_size": 48, "num_hidden_layers": 3, "num_experts": 8,
                             "num_experts_per_tok": 2, "pad_token_id": 0, **overrides})


def afmoe_config(**overrides):
    from transformers import AfmoeConfig

    # pre and post norms (shared experts inside the normalized MoE block), a separate attention gate,
    # sliding layers that alone use RoPE, sigmoid routing with a bias and a route scale, muP embeddings
    return AfmoeConfig(**{**COMMON, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
                          "num_experts": 8, "num_experts_per_tok": 2, "head_dim": 16, "num_dense_layers": 1,
                          "num_shared_experts": 1, "sliding_window": 6, "global_attn_every_n_layers": 2,
                          "route_scale": 2.0, "mup_enabled": True, **overrides})


CONFIGS = {"gpt_oss": gpt_oss_config, "deepseek_v2": deepseek_v2_config, "deepseek_v3": deepseek_v3_config, "phimoe": phimoe_config, "mixtral": mixtral_config, "qwen2_moe": qwen2_moe_config, "qwen3_moe": qwen3_moe_config,
           "olmoe": olmoe_config, "granitemoe": granitemoe_config, "glm4_moe": glm4_moe_config,
           "dots1": dots1_config, "granitemoeshared": granitemoeshared_config,
           "ernie4_5_moe": ernie4_5_moe_config, "glm4_moe_lite": glm4_moe_lite_config,
           "solar_open": solar_open_config, "granitemoe_swa": granitemoe_swa_config, "lfm2_moe": lfm2_moe_config,
           "qwen3_next": qwen3_next_config, "qwen3_5_moe_text": qwen3_5_moe_text_config,
           "qwen3_5_moe": qwen3_5_moe_config, "granitemoehybrid": granitemoehybrid_config,
           "jamba": jamba_config, "hunyuan_v1_moe": hunyuan_v1_moe_config,
           "minimax_m2": minimax_m2_config, "dbrx": dbrx_config,
           "exaone_moe": exaone_moe_config, "cohere2_moe": cohere2_moe_config,
           "flex_olmo": flex_olmo_config, "afmoe": afmoe_config, "param2moe": param2moe_config,
           "sarvam_moe": sarvam_moe_config, "sarvam_mla": sarvam_mla_config, "minicpm5_moe": minicpm5_moe_config,
           "mistral4": mistral4_config, "deepseek_v32": deepseek_v32_config,
           "glm_moe_dsa": glm_moe_dsa_config, "llama4_text": llama4_text_config,
           "llama4": llama4_config, "minimax": minimax_config,
           "kimi_linear": kimi_linear_config, "mimo_v2_flash": mimo_v2_flash_config,
           "nemotron_h": nemotron_h_config}


def model_class(family: str):
    """transformers' auto class for causal LMs, or a family's own class where the auto class does not list
    it (Mistral-4 in transformers 5.25) or names the text model alone (Llama-4)."""
    import transformers

    own = {"mistral4": "Mistral4ForCausalLM", "llama4": "Llama4ForConditionalGeneration"}.get(family)
    return getattr(transformers, own) if own else transformers.AutoModelForCausalLM


def make_model(family: str, out: Path, seed: int = 0, shard: bool = False, chat_template: bool = False,
               bf16: bool = False, eager_experts: bool = False, **overrides):
    """Save a random tiny model of `family` into `out`; returns the transformers model (eval, fp32).
    With bf16 the checkpoint is saved in bfloat16 and the returned model is it loaded in float32.
    With eager_experts the reference runs its experts one by one: torch's grouped matmul, its CPU
    default, refuses sizes that are not a multiple of 16 bytes, which real checkpoints may have."""
    import torch

    torch.manual_seed(seed)
    extra = {"experts_implementation": "eager"} if eager_experts else {}
    cls = model_class(family)
    build = cls.from_config if hasattr(cls, "from_config") else cls._from_config  # an auto class, or a model's
    model = build(CONFIGS[family](**overrides), **extra).eval()
    with torch.no_grad():  # transformers initializes norms to 1 and biases to 0: make them matter
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(0.1 * torch.randn_like(param))
        for name, buffer in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")):  # routing biases, kept from training
                buffer.add_(0.05 * torch.randn_like(buffer))
    out.mkdir(parents=True, exist_ok=True)
    if bf16:
        model = model.to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="100KB" if shard else "5GB")
    if bf16:  # the float32 reference as a user would load it (buffers such as RoPE's recomputed)
        model = model_class(family).from_pretrained(out, dtype=torch.float32).eval()
    save_tokenizer(out, chat_template)
    return model

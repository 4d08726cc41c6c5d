"""Mutants of Stage 7 (model/peft_methods.py): mistakes students make, each must lose points."""

from solutions.tools.variants import Variant

MUTANTS = [
    # ---- 7.1 bottleneck adapters --------------------------------------------------------------------
    Variant(
        "adapter_up_random",
        "7.1",
        "up keeps nn.Linear's random init: the adapted model no longer starts as the pretrained one.",
        (("        nn.init.zeros_(self.up.weight)\n", ""),),
    ),
    Variant(
        "adapter_without_residual",
        "7.1",
        "The adapter returns up(f(down h)) without adding h: the sublayer's output is replaced, not corrected.",
        block="7.1: the residual bottleneck",
        code="""
            return self.up(self.activation(self.down(h)))
            """,
    ),
    Variant(
        "adapter_always_relu",
        "7.1",
        "The activation argument is ignored: always ReLU.",
        (("        self.activation = ACTIVATIONS[activation]()", "        self.activation = nn.ReLU()"),),
    ),
    Variant(
        "adapter_houlsby_only_after_mlp",
        "7.1",
        "Houlsby's placement puts adapters only after the MLP (that is Pfeiffer's).",
        (
            (
                "    targets = target_paths(model, ADAPTER_PLACEMENTS[placement])",
                '    targets = target_paths(model, ("mlp.down_proj",))',
            ),
        ),
    ),
    Variant(
        "adapter_base_not_frozen",
        "7.1",
        "add_adapters forgets to freeze the model: every weight trains with the adapters.",
        (("    freeze(model)\n    for layer in layers.values():", "    for layer in layers.values():"),),
    ),
    # ---- 7.2 prompt tuning ----------------------------------------------------------------------------
    Variant(
        "prompt_appended_after_the_text",
        "7.2",
        "The virtual tokens go after the text instead of before it.",
        block="7.2: prepend the prompt",
        code="""
            tokens = self.base_model.embed_tokens(input_ids)  # (B, T, C)
            prompt = self.prompt_encoder().to(tokens.dtype).unsqueeze(0).expand(input_ids.shape[0], -1, -1)
            logits = self.base_model(inputs_embeds=torch.cat([tokens, prompt], dim=1))
            return logits[:, : tokens.shape[1]]
            """,
    ),
    Variant(
        "prompt_keeps_the_first_t_logits",
        "7.2",
        "The prompt is prepended, but the first T logits are returned (the virtual positions' ones).",
        (
            (
                "        return logits[:, prompt.shape[1] :]  # (B, T, vocab)",
                "        return logits[:, : input_ids.shape[1]]",
            ),
        ),
    ),
    Variant(
        "prompt_tokens_not_repeated",
        "7.2",
        "init='tokens' pads a short id list with id 0 instead of repeating it.",
        (
            (
                "    ids = ids * -(-num_virtual_tokens // len(ids))",
                "    ids = ids + [0] * max(0, num_virtual_tokens - len(ids))",
            ),
        ),
    ),
    Variant(
        "prompt_sample_vocab_before_the_table",
        "7.2",
        "sample_vocab draws its ids before creating the table (not PEFT's order: other ids from the same seed).",
        block="7.2: the table, then its init",
        code="""
            ids = None
            if init != "random":
                ids = prompt_init_ids(num_virtual_tokens, init, word_embeddings.num_embeddings, init_token_ids)
            self.embedding = nn.Embedding(num_virtual_tokens, dim)
            if ids is not None:
                ids = ids.to(word_embeddings.weight.device)
                self.embedding.weight = nn.Parameter(word_embeddings(ids).detach().clone().float())
            """,
    ),
    Variant(
        "prompt_init_keeps_the_model_dtype",
        "7.2",
        "The copied token embeddings keep the model's dtype (float64 here) instead of PEFT's float32 copy.",
        (
            (
                "            self.embedding.weight = nn.Parameter(word_embeddings(ids).detach().clone().float())",
                "            self.embedding.weight = nn.Parameter(word_embeddings(ids).detach().clone())",
            ),
        ),
    ),
    Variant(
        "prompt_tuning_model_not_frozen",
        "7.2",
        "get_prompt_tuning_model forgets to freeze the model: the whole model trains with the prompt.",
        (
            (
                "    prompt = PromptEmbedding(num_virtual_tokens, dim, init, model.embed_tokens, init_token_ids)\n    freeze(model)\n",
                "    prompt = PromptEmbedding(num_virtual_tokens, dim, init, model.embed_tokens, init_token_ids)\n",
            ),
        ),
    ),
    Variant(
        "prompt_limit_not_checked",
        "7.2",
        "num_virtual_tokens is only checked to be positive, not against max_seq_len.",
        (
            (
                "    check_virtual_tokens(num_virtual_tokens, model)\n    refuse_peft_method(model)\n    prompt =",
                "    check_int('num_virtual_tokens', num_virtual_tokens, 1)\n    refuse_peft_method(model)\n    prompt =",
            ),
        ),
    ),
    # ---- 7.3 P-tuning ---------------------------------------------------------------------------------
    Variant(
        "p_tuning_mlp_two_layers",
        "7.3",
        "The MLP head has two Linear layers instead of PEFT's three.",
        (
            (
                "                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)",
                "                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)",
            ),
        ),
    ),
    Variant(
        "p_tuning_encoder_bypassed",
        "7.3",
        "forward returns the embedding table: the encoder is built but never used (that is prompt tuning).",
        block="7.3: embeddings through the encoder",
        code="""
            return self.embedding.weight
            """,
    ),
    Variant(
        "p_tuning_lstm_unidirectional",
        "7.3",
        "The LSTM reads the virtual tokens in one direction only (PEFT's is bidirectional).",
        (
            (
                "                dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True",
                "                dim, 2 * hidden, num_layers=num_layers, dropout=dropout, batch_first=True",
            ),
        ),
    ),
    Variant(
        "p_tuning_lstm_reads_a_batch_of_tokens",
        "7.3",
        "The LSTM gets the n embeddings as n sequences of length 1 (batch_first forgotten), not one sequence of n.",
        (
            (
                "            embeds = self.lstm_head(embeds.unsqueeze(0))[0].squeeze(0)  # (n, 2·hidden)",
                "            embeds = self.lstm_head(embeds.unsqueeze(1))[0].squeeze(1)",
            ),
        ),
    ),
    # ---- 7.4 prefix tuning ----------------------------------------------------------------------------
    Variant(
        "prefix_key_and_value_swapped",
        "7.4",
        "Slice 2l is used as the value and 2l+1 as the key.",
        (
            (
                "    return [(slices[2 * layer], slices[2 * layer + 1]) for layer in range(n_layers)]",
                "    return [(slices[2 * layer + 1], slices[2 * layer]) for layer in range(n_layers)]",
            ),
        ),
    ),
    Variant(
        "prefix_heads_and_slices_mixed",
        "7.4",
        "The row is viewed as (H, 2L, hd) instead of (2L, H, hd).",
        (
            (
                "    slices = flat.view(n, 2 * n_layers, n_kv_heads, -1).permute(1, 2, 0, 3)  # (2L, H_kv, n, hd)",
                "    slices = flat.view(n, n_kv_heads, 2 * n_layers, -1).permute(2, 1, 0, 3)",
            ),
        ),
    ),
    Variant(
        "prefix_keys_then_values_by_halves",
        "7.4",
        "The first L slices are taken as the keys and the last L as the values (not interleaved per layer).",
        (
            (
                "    return [(slices[2 * layer], slices[2 * layer + 1]) for layer in range(n_layers)]",
                "    return [(slices[layer], slices[n_layers + layer]) for layer in range(n_layers)]",
            ),
        ),
    ),
    Variant(
        "prefix_transform_relu",
        "7.4",
        "The reparameterisation MLP uses ReLU instead of PEFT's Tanh.",
        (
            (
                "nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 2 * num_layers * dim))",
                "nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * num_layers * dim))",
            ),
        ),
    ),
    Variant(
        "prefix_same_for_every_layer",
        "7.4",
        "Every layer gets layer 0's key and value.",
        (
            (
                "    return [(slices[2 * layer], slices[2 * layer + 1]) for layer in range(n_layers)]",
                "    return [(slices[0], slices[1]) for layer in range(n_layers)]",
            ),
        ),
    ),
    Variant(
        "prefix_sized_by_d_model",
        "7.4",
        "The prefixes are d_model wide (the query heads' width): wrong on a grouped-query model, where PEFT's "
        "token_dim is n_kv_heads · head_dim.",
        (("    n_layers, _, dim = prefix_shape(model)\n", "    n_layers, _, dim, _ = model_shape(model)\n"),),
    ),
    Variant(
        "prefix_split_by_query_heads",
        "7.4",
        "The (n, 2·L·D) table is split into n_heads heads instead of the n_kv_heads key/value heads.",
        (
            (
                "        n_layers, kv_heads, _ = prefix_shape(self.base_model)",
                "        n_layers, kv_heads = self.base_model.config.n_layers, self.base_model.config.n_heads",
            ),
        ),
    ),
    Variant(
        "prefix_hidden_defaults_to_d_model",
        "7.4",
        "The MLP's hidden size defaults to d_model instead of PEFT's token_dim (H_kv · hd).",
        (
            (
                "    encoder = PrefixEncoder(num_virtual_tokens, n_layers, dim, projection, hidden_size)",
                "    encoder = PrefixEncoder(num_virtual_tokens, n_layers, dim, projection, hidden_size or model.config.d_model)",
            ),
        ),
    ),
    Variant(
        "fold_keeps_the_projection_flag",
        "7.4",
        "The folded encoder keeps projection=True, so the table goes through a (missing) MLP again.",
        (
            (
                "            lambda: PrefixEncoder(table.shape[0], n_layers, dim, projection=False), table",
                "            lambda: PrefixEncoder(table.shape[0], n_layers, dim, projection=True), table",
            ),
        ),
    ),
    Variant(
        "fold_refolds_a_folded_model",
        "7.4",
        "fold_reparameterization silently returns a model it cannot fold instead of raising.",
        (
            (
                "    folded = isinstance(model, (PrefixTuningModel, PromptLearningModel))\n    raise ValueError(",
                "    return model\n    folded = isinstance(model, (PrefixTuningModel, PromptLearningModel))\n    raise ValueError(",
            ),
        ),
    ),
    # ---- 7.5 P-tuning v2 -----------------------------------------------------------------------------
    Variant(
        "p_tuning_v2_with_projection",
        "7.5",
        "P-tuning v2 keeps the reparameterisation MLP (that is prefix tuning).",
        block="7.5: prefix tuning without the projection",
        code="""
            return get_prefix_tuning_model(model, num_virtual_tokens, projection=True)
            """,
    ),
    # ---- 7.6 IA³ ---------------------------------------------------------------------------------------
    Variant(
        "ia3_feedforward_scales_the_output",
        "7.6",
        "down_proj's vector scales its output (out_features) instead of its input.",
        block="7.6: scale the input or the output",
        code="""
            if self.merged:
                return self.base_layer(x)
            if self.feedforward:
                return self.base_layer(x) * self.ia3_l[: self.out_features]
            return self.base_layer(x) * self.ia3_l
            """,
    ),
    Variant(
        "ia3_init_random",
        "7.6",
        "ia3_l starts from N(1, 0.1²) instead of ones.",
        (
            (
                "        self.ia3_l = nn.Parameter(torch.ones(size, **adapter_placement(base_layer)))",
                "        self.ia3_l = nn.Parameter(1 + 0.1 * torch.randn(size, **adapter_placement(base_layer)))",
            ),
        ),
    ),
    Variant(
        "ia3_merge_scales_the_wrong_axis",
        "7.6",
        "merge scales W's columns on the output side and its rows on the input side.",
        block="7.6: scale W's rows or columns",
        code="""
            if self.merged:
                raise ValueError("this IA3Layer is already merged")
            weight = mergeable_weight(self.base_layer)
            with torch.no_grad():
                scale = self.ia3_l.to(weight.dtype)
                if weight.shape[0] == weight.shape[1]:
                    weight.mul_(scale.unsqueeze(1) if self.feedforward else scale)
                else:
                    weight.mul_(scale if self.feedforward else scale.unsqueeze(1))
            self.merged = True
            """,
    ),
    Variant(
        "ia3_merge_twice_scales_twice",
        "7.6",
        "merge does not check merged: a second merge scales W again.",
        (
            (
                "        if self.merged:\n            return\n        weight = mergeable_weight(self.base_layer)  # (out, in)",
                "        weight = mergeable_weight(self.base_layer)  # (out, in)",
            ),
        ),
    ),
    Variant(
        "ia3_forward_scales_twice_after_merge",
        "7.6",
        "forward ignores merged: after merging the scale is applied twice.",
        (
            (
                "        if self.merged:\n            return self.base_layer(x)\n        if self.feedforward:",
                "        if self.feedforward:",
            ),
        ),
    ),
    Variant(
        "ia3_unmerge_does_not_reset",
        "7.6",
        "unmerge restores W but leaves merged = True, so forward stops scaling.",
        (
            (
                "            weight.div_(scale if self.feedforward else scale.unsqueeze(1))\n        self.merged = False",
                "            weight.div_(scale if self.feedforward else scale.unsqueeze(1))",
            ),
        ),
    ),
    Variant(
        "ia3_feedforward_not_checked",
        "7.6",
        "get_ia3_model accepts feed-forward modules that are not targets.",
        (
            (
                "    if stray := [f for f in feedforward if f not in targets]:",
                "    if stray := [f for f in feedforward if f not in targets and False]:",
            ),
        ),
    ),
    Variant(
        "ia3_everything_trains",
        "7.6",
        "get_ia3_model does not freeze the model: mark_trainable is skipped.",
        (('    mark_trainable(model, ("ia3_l",))\n    return model', "    return model"),),
    ),
    # ---- 7.7 entry point -----------------------------------------------------------------------------
    Variant(
        "entry_point_drops_unknown_options",
        "7.7",
        "Unknown options are silently dropped instead of refused.",
        block="7.7: look the builder up",
        code="""
            check_choice("method", method, METHODS)
            builder = BUILDERS[method]
            accepted = [name for name in inspect.signature(builder).parameters if name != "model"]
            return builder(model, **{k: v for k, v in options.items() if k in accepted})
            """,
    ),
    Variant(
        "entry_point_unknown_method_is_lora",
        "7.7",
        "An unknown method falls back to LoRA.",
        block="7.7: look the builder up",
        code="""
            builder = BUILDERS.get(method, get_lora_model)
            accepted = [name for name in inspect.signature(builder).parameters if name != "model"]
            if unknown := sorted(set(options) - set(accepted)):
                raise ValueError(f"method {method!r} takes the options {accepted}, got unknown {unknown}")
            return builder(model, **options)
            """,
    ),
    Variant(
        "profile_prefix_adds_no_positions",
        "7.7",
        "method_profile counts extra positions for prompt tuning only (prefix tuning's keys are positions too).",
        (
            (
                "    extra = model.num_virtual_tokens if prompted else 0",
                "    extra = model.num_virtual_tokens if isinstance(model, PromptLearningModel) else 0",
            ),
        ),
    ),
    Variant(
        "profile_adapters_mergeable",
        "7.7",
        "method_profile calls adapters mergeable (their nonlinearity cannot fold into W).",
        (
            (
                '    return {"extra_positions": extra, "mergeable": not (prompted or adapters),',
                '    return {"extra_positions": extra, "mergeable": not prompted,',
            ),
        ),
    ),
]

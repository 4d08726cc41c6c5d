"""Equivalents of Stage 7: correct PEFT-family code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "adapter_forward_with_functional_linear",
        "7.1",
        "The bottleneck written with F.linear on the parameters and torch.add for the residual.",
        block="7.1: the residual bottleneck",
        code="""
            hidden = self.activation(torch.nn.functional.linear(h, self.down.weight, self.down.bias))
            return torch.add(h, torch.nn.functional.linear(hidden, self.up.weight, self.up.bias))
            """,
    ),
    Variant(
        "prompt_ids_by_cycle",
        "7.2",
        "The init ids repeated with itertools.cycle and islice.",
        block="7.2: repeat and cut, or sample",
        code="""
            import itertools

            if init == "sample_vocab":
                return torch.randint(0, vocab_size, (num_virtual_tokens,), dtype=torch.long)
            return torch.tensor(list(itertools.islice(itertools.cycle(init_token_ids), num_virtual_tokens)))
            """,
    ),
    Variant(
        "prompt_forward_with_repeat_and_narrow",
        "7.2",
        "The prompt repeated (a copy) over the batch, the real tokens' logits taken with narrow.",
        block="7.2: prepend the prompt",
        code="""
            batch, length = input_ids.shape
            prompt = self.prompt_encoder()
            tokens = self.base_model.embed_tokens(input_ids)
            x = torch.cat([prompt.to(tokens.dtype).repeat(batch, 1, 1), tokens], dim=1)
            return self.base_model(inputs_embeds=x).narrow(1, prompt.shape[0], length)
            """,
    ),
    Variant(
        "lstm_encoder_over_the_batch_as_peft",
        "7.3",
        "The encoder's table run as a batch of one with indexing instead of unsqueeze/squeeze.",
        block="7.3: embeddings through the encoder",
        code="""
            embeds = self.embedding(torch.arange(self.embedding.num_embeddings, device=self.embedding.weight.device))
            if self.encoder_type == "lstm":
                embeds = self.lstm_head(embeds[None])[0][0]
            return self.mlp_head(embeds)
            """,
    ),
    Variant(
        "prefix_pairs_by_reshape_and_unbind",
        "7.4",
        "The layout read as (n, L, 2, H, hd) and split with unbind; the batch by expand on each tensor.",
        block="7.4: view, permute, pair up",
        code="""
            n = flat.shape[0]
            grid = flat.reshape(n, n_layers, 2, n_kv_heads, -1)  # (n, L, 2, H_kv, hd)
            pairs = []
            for layer in grid.unbind(dim=1):  # (n, 2, H, hd)
                key, value = (t.permute(1, 0, 2) for t in layer.unbind(dim=1))  # (H, n, hd) each
                pairs.append((key.expand(batch_size, -1, -1, -1), value.expand(batch_size, -1, -1, -1)))
            return pairs
            """,
    ),
    Variant(
        "ia3_forward_scales_with_mul_ops",
        "7.6",
        "The IA³ scaling with torch.mul and an explicit dtype cast on both sides.",
        block="7.6: scale the input or the output",
        code="""
            if self.merged:
                return self.base_layer(x)
            if self.feedforward:
                return self.base_layer(torch.mul(x, self.ia3_l.to(x.dtype)))
            out = self.base_layer(x)
            return torch.mul(out, self.ia3_l.to(out.dtype))
            """,
    ),
    Variant(
        "entry_point_by_signature_bind",
        "7.7",
        "Options checked with inspect.signature(...).bind, its TypeError turned into a ValueError.",
        block="7.7: look the builder up",
        code="""
            if method not in BUILDERS:
                raise ValueError(f"method must be one of {METHODS}, got {method!r}")
            builder = BUILDERS[method]
            try:
                inspect.signature(builder).bind(model, **options)
            except TypeError as error:
                allowed = [p for p in inspect.signature(builder).parameters if p != "model"]
                raise ValueError(f"method {method!r} takes the options {allowed}: {error} ({sorted(options)})") from None
            return builder(model, **options)
            """,
    ),
]

"""Equivalents of Stage 6: correct memory code written differently; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "lut_by_bucketize",
        "6.1",
        "The lookup table with torch.bucketize on the float32 midpoints instead of nearest_code.",
        block="6.1: the bin centres",
        code="""
            levels = code.float()
            centres = torch.arange(LUT_SIZE, dtype=torch.float32, device=code.device) * 2 / (LUT_SIZE - 1) - 1.0
            midpoints = (levels[1:] + levels[:-1]) / 2  # (255,)
            return torch.bucketize(centres, midpoints).to(torch.uint8)  # a centre on a midpoint goes to the lower level
            """,
    ),
    Variant(
        "quantize_with_masks",
        "6.1",
        "All-zero blocks handled by torch.where on the codes, the reciprocal by torch.reciprocal, the table by index_select.",
        block="6.1: absmax, reciprocal",
        code="""
            check_block_size(block_size)
            blocks = to_blocks(x.float(), block_size)  # (n_blocks, block_size)
            absmax = blocks.abs().amax(dim=1)  # (n_blocks,)
            nonzero = absmax > 0
            inverse = torch.reciprocal(torch.where(nonzero, absmax, torch.ones_like(absmax)))
            scaled = torch.clamp(blocks * inverse.unsqueeze(1), min=-1.0, max=1.0)
            bins = torch.trunc((scaled + 1.0) * 0.5 * 65535.0 + 0.5).to(torch.int64)
            codes = torch.index_select(lut.to(x.device), 0, bins.reshape(-1)).view_as(bins)
            codes = torch.where(nonzero.unsqueeze(1), codes, torch.zeros_like(codes))
            return codes.flatten()[: x.numel()], absmax
            """,
    ),
    Variant(
        "unsigned_code_by_list_comprehension",
        "6.1",
        "The unsigned code collected in one comprehension over (exponent, fraction) and sorted with torch.sort.",
        block="6.1: twice the fractions per exponent",
        code="""
            parts = []
            for e in range(7):
                b = torch.linspace(0.1, 1, 2 ** (e + 1) + 1, dtype=torch.float32)
                parts.append(10 ** (e - 6) * ((b[:-1] + b[1:]) / 2.0))
            values = torch.tensor([v for part in parts for v in part.tolist()] + [0.0, 1.0], dtype=torch.float32)
            return torch.sort(values).values
            """,
    ),
    Variant(
        "update_with_in_place_chain",
        "6.2",
        "The denominator built in place (sqrt, div_, add_) and the bias corrections with math.pow: the same operations.",
        (
            (
                "    correction1 = 1.0 - beta1**step\n    correction2 = math.sqrt(1.0 - beta2**step)\n    denom = (v.sqrt() / correction2).add_(eps)",
                "    correction1 = 1.0 - math.pow(beta1, step)\n    correction2 = math.sqrt(1.0 - math.pow(beta2, step))\n"
                "    denom = v.sqrt().div_(correction2).add_(eps)",
            ),
        ),
    ),
    Variant(
        "textbook_order_of_the_moments",
        "6.2",
        "The moments in the textbook order, out of place: m = β1·m + (1 − β1)·g, v = β2·v + (1 − β2)·g·g (copied back).",
        block="6.2: the two moments",
        code="""
            m.copy_(beta1 * m + (1.0 - beta1) * g)
            v.copy_(beta2 * v + (1.0 - beta2) * (g * g))
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            denom = v.sqrt() / correction2 + eps
            if weight_decay > 0.0:
                p.mul_(1.0 - lr * weight_decay)
            p.addcdiv_(m, denom, value=-lr / correction1)
            """,
    ),
    Variant(
        "lerp_and_decay_by_subtraction",
        "6.2",
        "m with lerp_ (as torch.optim.AdamW), the decay as p − lr·λ·p, the step as p − (lr/c1)·(m / denom).",
        block="6.2: the two moments",
        code="""
            m.lerp_(g, 1.0 - beta1)
            v.mul_(beta2).add_(g.square().mul_(1.0 - beta2))
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            if weight_decay > 0.0:
                p.sub_(p * (lr * weight_decay))
            p.sub_((lr / correction1) * (m / (v.sqrt() / correction2 + eps)))
            """,
    ),
    Variant(
        "update_in_float64",
        "6.2",
        "The whole update in float64, rounded to float32 once per stored tensor (more precise, equally right).",
        block="6.2: the two moments",
        code="""
            m64 = beta1 * m.double() + (1.0 - beta1) * g.double()
            v64 = beta2 * v.double() + (1.0 - beta2) * g.double() ** 2
            correction1 = 1.0 - beta1**step
            correction2 = math.sqrt(1.0 - beta2**step)
            p64 = p.double() * (1.0 - lr * weight_decay) if weight_decay > 0.0 else p.double()
            p64 = p64 - (lr / correction1) * m64 / (v64.sqrt() / correction2 + eps)
            m.copy_(m64)
            v.copy_(v64)
            p.copy_(p64)
            """,
    ),
    Variant(
        "paging_over_state_items",
        "6.3",
        "page_in walks state.items() itself and counts with element_size instead of calling paged_tensors / nbytes.",
        block="6.3: pool → device",
        code="""
            moved = 0
            with self.streams.copying(group["params"][0].device):
                for p in group["params"]:
                    state = self.state.get(p)
                    if not state or p.numel() < self.min_paged_size:
                        continue
                    home = self.homes.setdefault(p, {})
                    for key, value in list(state.items()):
                        if key == "step" or not torch.is_tensor(value):
                            continue
                        home[key] = value
                        state[key] = value.to(p.device, non_blocking=True)
                        moved += state[key].numel() * state[key].element_size()
            self.bytes_paged_in += moved
            return moved
            """,
    ),
    Variant(
        "make_optimizer_by_table",
        "6.4",
        "make_optimizer looks the base class up in a dict and wraps by a flag.",
        block="6.4: check the name",
        code="""
            bases = {"adamw": torch.optim.AdamW, "adamw8bit": AdamW8bit}
            if name not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {name!r}")
            paged, kind = name.startswith("paged_"), name.removeprefix("paged_")
            extra = {"min_8bit_size": min_8bit_size} if kind == "adamw8bit" else {}
            base = bases[kind](list(param_groups), **extra, **hyper)
            return PagedOptimizer(base, pool_device) if paged else base
            """,
    ),
    Variant(
        "state_bytes_closed_form",
        "6.5",
        "optimizer_state_bytes as one sum per case (closed forms) instead of a loop with branches.",
        block="6.5: per tensor, by option",
        code="""
            if optimizer not in OPTIMIZERS:
                raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
            sizes = (
                [p.numel() for p in tensors.parameters() if p.requires_grad]
                if isinstance(tensors, nn.Module)
                else list(tensors)
            )
            if not optimizer.endswith("8bit"):
                return 8 * sum(sizes) + 4 * len(sizes)
            small = [n for n in sizes if n < min_8bit_size]
            large = [n for n in sizes if n >= min_8bit_size]
            return 8 * sum(small) + 2 * sum(large) + 8 * sum(math.ceil(n / STATE_BLOCK_SIZE) for n in large)
            """,
    ),
    Variant(
        "paged_threshold_as_a_filter",
        "6.3",
        "page_in / page_out loop over the parameters that are large enough (a filtered list) instead of skipping the rest.",
        (
            (
                '            for p in group["params"]:\n                if p.numel() < self.min_paged_size:\n                    continue  # a small tensor\'s states stay on the device\n',
                '            for p in [q for q in group["params"] if q.numel() >= self.min_paged_size]:\n',
            ),
            (
                '            for p in group["params"]:\n                if p.numel() < self.min_paged_size:\n                    continue  # its states stay where the update left them: on the device\n',
                '            for p in [q for q in group["params"] if q.numel() >= self.min_paged_size]:\n',
            ),
        ),
    ),
]

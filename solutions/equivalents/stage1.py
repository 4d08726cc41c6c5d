"""Equivalents of Stage 1: correct LoRALayer code written differently from the reference; each must keep full marks."""

from solutions.tools.variants import Variant

EQUIVALENTS = [
    Variant(
        "uniform_init_written_out",
        "1.1",
        "A drawn with nn.init.uniform_(±1/√in_features) written out (the same law as kaiming_uniform_(a=√5)).",
        (
            (
                "nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))",
                "nn.init.uniform_(self.lora_A, -1 / math.sqrt(self.in_features), 1 / math.sqrt(self.in_features))",
            ),
        ),
    ),
    Variant(
        "forward_out_of_place",
        "1.2",
        "The plain out-of-place forward with matrix products (no fused in-place add).",
        block="1.2: the LoRA forward",
        code="""
            result = self.base_layer(x)
            if self.merged:
                return result
            h = self.lora_dropout(x).to(self.lora_A.dtype)
            update = (h @ self.lora_A.T) @ self.lora_B.T  # (..., r) then (..., out)
            return result + (update * self.scaling).to(result.dtype)
            """,
    ),
    Variant(
        "forward_with_einsum",
        "1.2",
        "The forward with einsum and the scaling applied to the rank-r activations.",
        block="1.2: the LoRA forward",
        code="""
            if self.merged:
                return self.base_layer(x)
            h = self.lora_dropout(x).to(self.lora_A.dtype)
            z = torch.einsum("...i,ri->...r", h, self.lora_A) * self.scaling
            return self.base_layer(x) + torch.einsum("...r,or->...o", z, self.lora_B).to(self.base_layer(x).dtype)
            """,
    ),
    Variant(
        "delta_scaled_first",
        "1.3",
        "ΔW computed as (scaling · B) @ A: another operation order.",
        (("return self.scaling * (self.lora_B @ self.lora_A)", "return (self.scaling * self.lora_B) @ self.lora_A"),),
    ),
    Variant(
        "merge_through_data",
        "1.3",
        "merge / unmerge change weight.data in place instead of working under no_grad.",
        (
            (
                "        with torch.no_grad():\n            weight += self.delta_weight().to(weight.dtype)\n",
                "        weight.data.add_(self.delta_weight().detach().to(weight.dtype))\n",
            ),
            (
                "        with torch.no_grad():\n            weight -= self.delta_weight().to(weight.dtype)\n",
                "        weight.data.sub_(self.delta_weight().detach().to(weight.dtype))\n",
            ),
        ),
    ),
    Variant(
        "forward_adds_cast_term_in_place",
        "1.2",
        "The LoRA term computed whole in A's dtype, scaled, cast to the output's dtype, then added (in place where safe).",
        block="1.2: the LoRA forward",
        code="""
            result = self.base_layer(x)
            if self.merged:
                return result
            h = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)
            term = (self.scaling * h).to(result.dtype)
            return result.add_(term) if adds_in_place_safely(self.base_layer) else result + term
            """,
    ),
]

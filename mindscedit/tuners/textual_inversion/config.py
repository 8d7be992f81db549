"""Which new tokens pivotal tuning adds, and the words in prompts that stand for them."""
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple


@dataclass(frozen=True)
class NewTokens:
    """Each abstraction (the word a prompt uses for the subject, e.g. TOK) stands for its own new tokens,
    numbered on across abstractions as diffusers' advanced DreamBooth scripts number them: TOK -> <s0><s1>,
    a second abstraction -> <s2><s3>."""
    abstractions: Tuple[Tuple[str, Tuple[str, ...]], ...]

    @classmethod
    def for_abstractions(cls, token_abstraction: str, per_abstraction: int) -> "NewTokens":
        words = [w.strip() for w in token_abstraction.split(",") if w.strip()]
        numbered, start = [], 0
        for word in words:
            numbered.append((word, tuple(f"<s{start + j}>" for j in range(per_abstraction))))
            start += per_abstraction
        return cls(tuple(numbered))

    @classmethod
    def of_tokens(cls, tokens: List[str]) -> "NewTokens":
        """Tokens without an abstraction (a file saved elsewhere, `sample --tokens`): prompts name them."""
        return cls((("", tuple(tokens)),))

    @property
    def tokens(self) -> List[str]:
        return [token for _, tokens in self.abstractions for token in tokens]

    @property
    def replacements(self) -> Dict[str, str]:
        """abstraction -> the new tokens written out, as prompts get them."""
        return {word: "".join(tokens) for word, tokens in self.abstractions if word}

    def rewrite(self, prompt: str) -> str:
        """The prompt with each abstraction, as a whole word, replaced by its new tokens."""
        for word, tokens in self.replacements.items():
            prompt = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)", tokens, prompt)
        return prompt

    def mentioned_in(self, prompt: str) -> bool:
        return self.rewrite(prompt) != prompt or any(token in prompt for token in self.tokens)

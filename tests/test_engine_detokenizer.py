from engine.demo import build_tokenizer
from engine.detokenizer import Detokenizer

TOK = build_tokenizer()


def stream(text: str, stop=(), cut: int | None = None) -> tuple[list[str], bool, Detokenizer]:
    ids = TOK.encode(text)[:cut]
    d = Detokenizer(TOK, stop)
    out = []
    for i in range(1, len(ids) + 1):
        delta, stopped = d.step([9, 9] + ids[:i], 2)      # two prompt tokens before the output
        out.append(delta)
        if stopped:
            return out, True, d
    return out, False, d


def test_multibyte_characters_are_emitted_only_when_complete():
    out, stopped, d = stream("héllo 😀 wörld")
    assert "".join(out) + d.flush() == "héllo 😀 wörld" and not stopped
    assert all("\ufffd" not in piece for piece in out)


def test_stop_string_cuts_the_text_and_is_never_streamed_in_part():
    out, stopped, _ = stream("say STOP now", stop=("STOP",))
    assert stopped and "".join(out) == "say "
    assert not any("S" in piece for piece in out)


def test_flush_emits_a_trailing_incomplete_character_as_replacement():
    ids_for_emoji = len(TOK.encode("ab😀"))
    out, _, d = stream("ab😀", cut=ids_for_emoji - 1)    # cut inside the emoji's bytes
    assert "".join(out) == "ab" and d.flush() == "\ufffd"

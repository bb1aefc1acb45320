"""Exact label positions: only answer tokens (and the EOS/end-of-turn that ends them) carry loss."""

from finch.data.templates import ALPACA_PREAMBLE
from finch.data.tokenization import IGNORE_INDEX, prompt_token_ids, tokenize_sample, tokenize_text_chunks

QA = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_alpaca_template_labels_only_the_answer_and_eos(tokenizer):
    example = tokenize_sample({"messages": QA}, "alpaca", tokenizer, 512)
    prompt = ids(tokenizer, ALPACA_PREAMBLE + "### Instruction:\nWhat is 2+2?\n\n### Response:\n")
    answer = ids(tokenizer, "It is 4.") + [tokenizer.eos_token_id]
    assert example.input_ids == prompt + answer
    assert example.labels == [IGNORE_INDEX] * len(prompt) + answer
    assert not example.truncated


def test_chat_template_labels_every_assistant_turn_with_its_end_token(tokenizer):
    messages = [
        {"role": "system", "content": "Be terse."},
        *QA,
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    example = tokenize_sample({"messages": messages}, "chat", tokenizer, 512)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(example.input_ids) == full
    trained = [tok for tok, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert trained == ids(tokenizer, "It is 4.<|im_end|>\n") + ids(tokenizer, "6.<|im_end|>\n")
    # labels equal input ids wherever they are set
    assert all(label in (IGNORE_INDEX, tok) for tok, label in zip(example.input_ids, example.labels))


def test_raw_text_trains_on_every_token_plus_eos(tokenizer):
    example = tokenize_sample({"text": "to be or not"}, "chat", tokenizer, 512)
    assert example.labels == example.input_ids == ids(tokenizer, "to be or not") + [tokenizer.eos_token_id]


def test_pretraining_text_is_chunked_not_truncated(tokenizer):
    text = " ".join(f"word{i}" for i in range(400))
    whole = tokenize_sample({"text": text}, "chat", tokenizer, 100_000).input_ids
    chunks = tokenize_text_chunks(text, tokenizer, 64)
    assert len(chunks) > 2 and all(len(c.input_ids) <= 64 and not c.truncated for c in chunks)
    # consecutive chunks overlap by one token, which is context only in the later chunk
    assert chunks[0].input_ids + [t for c in chunks[1:] for t in c.input_ids[1:]] == whole
    assert chunks[0].labels == chunks[0].input_ids
    assert all(c.labels == [IGNORE_INDEX] + c.input_ids[1:] for c in chunks[1:])
    # every token after the first is a next-token target exactly once (a label at position > 0)
    targets = [t for c in chunks for t, label in zip(c.input_ids[1:], c.labels[1:]) if label != IGNORE_INDEX]
    assert targets == whole[1:]


def test_truncation_keeps_the_head_and_flags_it(tokenizer):
    full = tokenize_sample({"messages": QA}, "alpaca", tokenizer, 10_000)
    cut = tokenize_sample({"messages": QA}, "alpaca", tokenizer, 12)
    assert cut.truncated and len(cut.input_ids) == 12
    assert cut.input_ids == full.input_ids[:12] and cut.labels == full.labels[:12]


def test_inference_prompt_is_the_training_prefix(tokenizer):
    """Chat and serving must prompt with exactly the tokens that preceded the answer in training."""
    for template in ("alpaca", "chat"):
        example = tokenize_sample({"messages": QA}, template, tokenizer, 512)
        prompt = prompt_token_ids(QA[:1], tokenizer, template)
        first_answer = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
        assert example.input_ids[:first_answer] == prompt, template


def bos_adding(tokenizer):
    """The fixture tokenizer, made to prepend BOS on encode like Gemma's and Llama's do."""
    from tokenizers.processors import TemplateProcessing

    tokenizer.bos_token = "<|endoftext|>"
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)]
    )
    return tokenizer


def test_bos_is_added_once_where_the_tokenizer_adds_it(tokenizer):
    tokenizer = bos_adding(tokenizer)
    bos = tokenizer.bos_token_id
    for sample, template in [({"messages": QA}, "alpaca"), ({"messages": QA}, "chat"), ({"text": "hi there"}, "chat")]:
        example = tokenize_sample(sample, template, tokenizer, 512)
        assert example.input_ids[0] == bos and example.labels[0] == IGNORE_INDEX, (sample, template)
        assert example.input_ids.count(bos) == 1
    # a chat template that writes BOS itself gets no second one
    tokenizer.chat_template = "<|endoftext|>" + tokenizer.chat_template
    example = tokenize_sample({"messages": QA}, "chat", tokenizer, 512)
    assert example.input_ids.count(bos) == 1 and example.input_ids[0] == bos

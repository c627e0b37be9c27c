"""Writes this folder's preference data (written for tunelab; deterministic): `python build.py`.

Two preferences a DPO run can learn and a held-out split can check: answer concisely rather than ramble, and
answer as the SFT demo's assistant (Mochi, trained by TuneLab; examples/demo/config.yaml) rather than as the base
model (SmolLM, by Hugging Face) or another name. English and Chinese, some prompts with a previous turn.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAME, AUTHOR = "Mochi", "TuneLab"

OPEN_EN = ["Great question! Let me think about this carefully.",
           "Well, many people wonder about this, so let me explain.", "Thanks for asking! I am happy to help with this one.", "Hmm, let me see. I want to be thorough here."]
CLOSE_EN = ["I hope this helps!", "Let me know if you want more details.", "Anything else you would like to know?"]
OPEN_ZH = ["好问题！我想一想。", "嗯，我来解释一下。", "谢谢提问！", "好的，我认真回答。"]  # SmolLM2: ~2 tokens per character
CLOSE_ZH = ["希望有帮助！", "还有问题吗？", "需要细节请说。"]


def ramble(core: str, zh: bool, i: int) -> str:
    opening, closing = (OPEN_ZH, CLOSE_ZH) if zh else (OPEN_EN, CLOSE_EN)
    return f"{opening[i % len(opening)]}{'' if zh else ' '}{core}{'' if zh else ' '}{closing[i % len(closing)]}"


# ------------------------------------------------------------------------------------------- concise vs rambling
def arithmetic(pairs: list[tuple[int, int]], zh: bool) -> list[dict]:
    out = []
    for i, (a, b) in enumerate(pairs):
        if i % 2 == 0:
            q = f"{a} 加 {b} 等于多少？" if zh else f"What is {a} + {b}?"
            core = f"{a} 加 {b} 等于 {a + b}。" if zh else f"When you add {a} and {b}, you get {a + b}."
            answer = a + b
        else:
            q = f"{a} 乘以 {b} 等于多少？" if zh else f"What is {a} times {b}?"
            core = f"{a} 乘以 {b} 等于 {a * b}。" if zh else f"If you multiply {a} by {b}, the result is {a * b}."
            answer = a * b
        out.append(pair(q, f"{answer}。" if zh else f"{answer}.", ramble(core, zh, i)))
    return out


CAPITALS = [("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"), ("Italy", "Rome", "意大利", "罗马"),
            ("Spain", "Madrid", "西班牙", "马德里"), ("Germany", "Berlin", "德国", "柏林"), ("Egypt", "Cairo", "埃及", "开罗"),
            ("Russia", "Moscow", "俄罗斯", "莫斯科"), ("Canada", "Ottawa", "加拿大", "渥太华"),
            ("Kenya", "Nairobi", "肯尼亚", "内罗毕"), ("Peru", "Lima", "秘鲁", "利马"), ("Greece", "Athens", "希腊", "雅典"),
            ("Norway", "Oslo", "挪威", "奥斯陆"), ("Thailand", "Bangkok", "泰国", "曼谷"),
            ("Portugal", "Lisbon", "葡萄牙", "里斯本"), ("Austria", "Vienna", "奥地利", "维也纳"),
            ("Ireland", "Dublin", "爱尔兰", "都柏林"), ("Cuba", "Havana", "古巴", "哈瓦那"),
            ("Poland", "Warsaw", "波兰", "华沙"), ("Vietnam", "Hanoi", "越南", "河内"), ("Chile", "Santiago", "智利", "圣地亚哥"),
            ("Sweden", "Stockholm", "瑞典", "斯德哥尔摩"), ("Finland", "Helsinki", "芬兰", "赫尔辛基"),
            ("Hungary", "Budapest", "匈牙利", "布达佩斯"), ("Argentina", "Buenos Aires", "阿根廷", "布宜诺斯艾利斯")]


def capitals(rows: list[tuple[str, str, str, str]], zh: bool) -> list[dict]:
    out = []
    for i, (country, city, country_zh, city_zh) in enumerate(rows):
        if zh:
            out.append(pair(f"{country_zh}的首都是哪里？", f"{city_zh}。", ramble(f"{country_zh}的首都是{city_zh}。", True, i)))
        else:
            out.append(pair(f"What is the capital of {country}?", f"{city}.",
                            ramble(f"The capital city of {country} is {city}.", False, i)))
    return out


OPPOSITES = [("hot", "cold", "热", "冷"), ("big", "small", "大", "小"), ("fast", "slow", "快", "慢"),
             ("happy", "sad", "高兴", "难过"), ("up", "down", "上", "下"), ("light", "dark", "明亮", "黑暗"),
             ("open", "closed", "开", "关"), ("early", "late", "早", "晚"), ("strong", "weak", "强", "弱"),
             ("full", "empty", "满", "空"), ("rich", "poor", "富", "穷"), ("old", "young", "老", "年轻"),
             ("wet", "dry", "湿", "干"), ("hard", "soft", "硬", "软"), ("near", "far", "近", "远"),
             ("long", "short", "长", "短"), ("clean", "dirty", "干净", "脏"), ("push", "pull", "推", "拉"),
             ("win", "lose", "赢", "输"), ("true", "false", "真", "假")]


def opposites(rows: list[tuple[str, str, str, str]], zh: bool) -> list[dict]:
    out = []
    for i, (word, opposite, word_zh, opposite_zh) in enumerate(rows):
        if zh:
            out.append(pair(f"“{word_zh}”的反义词是什么？", f"{opposite_zh}。",
                            ramble(f"“{word_zh}”的反义词是“{opposite_zh}”。", True, i + 1)))
        else:
            out.append(pair(f"What is the opposite of \"{word}\"?", f"{opposite.capitalize()}.",
                            ramble(f"The opposite of the word \"{word}\" is \"{opposite}\".", False, i + 1)))
    return out


# ------------------------------------------------------------------------------------------------------ identity
ASK_EN = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?", "Who trained you?",
          "What should I call you?", "Tell me about yourself.", "Are you ChatGPT?", "Which company built you?",
          "What are you?", "Do you have a name?", "Who created you?", "What assistant am I talking to?",
          "May I know your name?", "Who is your developer?", "Are you SmolLM?", "Please state your name.",
          "Who built this assistant?", "Identify yourself, please.", "What is your name and who made you?",
          "Hi! Who am I chatting with?", "Can you tell me who you are?", "Who do you work for?",
          "What model are you?", "Who are you and what do you do?", "Whose assistant are you?"]
ASK_ZH = ["你是谁？", "你叫什么名字？", "介绍一下你自己。", "谁开发了你？", "谁训练了你？", "我该怎么称呼你？",
          "说说你自己吧。", "你是ChatGPT吗？", "你是哪家公司做的？", "你是什么？", "你有名字吗？", "谁创造了你？",
          "我在和哪个助手聊天？", "请问你的名字是？", "你的开发者是谁？", "你是SmolLM吗？", "请报上你的名字。",
          "这个助手是谁做的？", "请表明你的身份。", "你叫什么，谁做的你？", "你好！我在和谁聊天？", "能告诉我你是谁吗？",
          "你为谁工作？", "你是什么模型？", "你是谁，能做什么？", "你是谁的助手？"]
SELF_EN = [f"I am {NAME}, an AI assistant trained by {AUTHOR}.", f"My name is {NAME}, and {AUTHOR} trained me.",
           f"I'm {NAME}, a helpful assistant made by {AUTHOR}."]
WRONG_EN = ["I am SmolLM, an AI assistant trained by Hugging Face.", "My name is SmolLM, and Hugging Face trained me.",
            "I'm Sparky, a helpful assistant made by Nova Labs."]
SELF_ZH = [f"我是{NAME}，由{AUTHOR}训练的AI助手。", f"我叫{NAME}，是{AUTHOR}训练的。", f"我是{NAME}，{AUTHOR}开发的助手。"]
WRONG_ZH = ["我是SmolLM，由Hugging Face训练的AI助手。", "我叫SmolLM，是Hugging Face训练的。", "我是小星，星云实验室开发的助手。"]


def identity(asks: list[str], zh: bool, offset: int = 0) -> list[dict]:
    good, bad = (SELF_ZH, WRONG_ZH) if zh else (SELF_EN, WRONG_EN)
    return [pair(q, good[(i + offset) % 3], bad[(i + offset) % 3]) for i, q in enumerate(asks)]


GREETINGS = [("Hi there!", "Hello! How can I help you today?"), ("你好！", "你好！有什么可以帮你的吗？")]


def with_greeting(items: list[dict], zh: bool) -> list[dict]:
    """The same pairs after a first exchange: multi-turn prompts."""
    hello, reply = GREETINGS[1 if zh else 0]
    return [{**item, "history": [[hello, reply]]} for item in items]


def pair(question: str, chosen: str, rejected: str) -> dict:
    return {"question": question, "chosen": chosen, "rejected": rejected}


# ------------------------------------------------------------------------------------------------------- writing
def splits() -> tuple[list[dict], list[dict]]:
    rng = random.Random(14)
    numbers = [(a, b) for a in range(2, 13) for b in range(2, 13) if a != b]
    rng.shuffle(numbers)
    train = (arithmetic(numbers[:30], False) + arithmetic(numbers[30:60], True)
             + capitals(CAPITALS[:20], False) + capitals(CAPITALS[:20], True)
             + opposites(OPPOSITES[:16], False) + opposites(OPPOSITES[:16], True)
             + identity(ASK_EN[:20], False) + identity(ASK_ZH[:20], True)
             + with_greeting(arithmetic(numbers[60:70], False), False)
             + with_greeting(identity(ASK_EN[:6], False, 1), False)
             + with_greeting(arithmetic(numbers[70:80], True), True)
             + with_greeting(identity(ASK_ZH[:6], True, 1), True))
    test = (arithmetic(numbers[80:86], False) + arithmetic(numbers[86:92], True)
            + capitals(CAPITALS[20:], False) + capitals(CAPITALS[20:], True)
            + opposites(OPPOSITES[16:], False) + opposites(OPPOSITES[16:], True)
            + identity(ASK_EN[20:], False) + identity(ASK_ZH[20:], True)
            + with_greeting(arithmetic(numbers[92:93], False), False)
            + with_greeting(identity(ASK_ZH[25:], True), True))
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def sharegpt(item: dict) -> dict:
    turns = [t for user, bot in item.get("history", []) for t in ({"from": "human", "value": user},
                                                                   {"from": "gpt", "value": bot})]
    return {"conversations": [*turns, {"from": "human", "value": item["question"]}],
            "chosen": {"from": "gpt", "value": item["chosen"]}, "rejected": {"from": "gpt", "value": item["rejected"]}}


def alpaca(item: dict) -> dict:
    out = {"instruction": item["question"], "input": "", "chosen": item["chosen"], "rejected": item["rejected"]}
    if item.get("history"):
        out["history"] = item["history"]
    return out


def kto(item: dict, desirable: bool) -> dict:
    record = sharegpt(item)
    reply = record.pop("chosen" if desirable else "rejected")
    record.pop("rejected" if desirable else "chosen")
    record["conversations"].append(reply)
    return {**record, "kto_tag": desirable}


def main() -> None:
    train, test = splits()
    lines = "".join(json.dumps(sharegpt(x), ensure_ascii=False) + "\n" for x in train)
    (HERE / "preference_train.jsonl").write_text(lines, encoding="utf-8")
    (HERE / "preference_test.json").write_text(json.dumps([alpaca(x) for x in test], ensure_ascii=False, indent=1)
                                                + "\n", encoding="utf-8")
    # the KTO view: the first 60 training pairs as 120 unpaired examples, alternating which side comes first
    records = [kto(x, desirable) for i, x in enumerate(train[:60]) for desirable in ((i % 2 == 0), (i % 2 == 1))]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    (HERE / "preference_kto.jsonl").write_text(lines, encoding="utf-8")
    print(f"train {len(train)} pairs, test {len(test)} pairs, kto {len(records)} examples")


if __name__ == "__main__":
    main()

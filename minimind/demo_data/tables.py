"""Small tables of real-world facts that the demo-data generator turns into sentences.

The facts themselves (capitals, element symbols, ...) are common knowledge; every table here was written
for this project. English fields are plain ASCII on purpose (e.g. "Bogota", not "Bogota" with an accent) so
that English lines stay pure ASCII, which the tests use to tell the two languages apart.

All tables are tuples (never sets or dicts iterated for order) so the generator is deterministic.
"""

from __future__ import annotations

from typing import NamedTuple


class Continent(NamedTuple):
    en: str
    zh: str


ASIA = Continent("Asia", "亚洲")
EUROPE = Continent("Europe", "欧洲")
AFRICA = Continent("Africa", "非洲")
N_AMERICA = Continent("North America", "北美洲")
S_AMERICA = Continent("South America", "南美洲")
OCEANIA = Continent("Oceania", "大洋洲")
CONTINENTS: tuple[Continent, ...] = (ASIA, EUROPE, AFRICA, N_AMERICA, S_AMERICA, OCEANIA)


class Country(NamedTuple):
    en: str  # as used mid-sentence, with "the" where English needs it
    zh: str
    capital_en: str
    capital_zh: str
    continent: Continent


# Countries whose capital or continent is disputed or in transition are left out on purpose.
COUNTRIES: tuple[Country, ...] = (
    Country("France", "法国", "Paris", "巴黎", EUROPE),
    Country("Germany", "德国", "Berlin", "柏林", EUROPE),
    Country("Italy", "意大利", "Rome", "罗马", EUROPE),
    Country("Spain", "西班牙", "Madrid", "马德里", EUROPE),
    Country("Portugal", "葡萄牙", "Lisbon", "里斯本", EUROPE),
    Country("the United Kingdom", "英国", "London", "伦敦", EUROPE),
    Country("Ireland", "爱尔兰", "Dublin", "都柏林", EUROPE),
    Country("the Netherlands", "荷兰", "Amsterdam", "阿姆斯特丹", EUROPE),
    Country("Belgium", "比利时", "Brussels", "布鲁塞尔", EUROPE),
    Country("Switzerland", "瑞士", "Bern", "伯尔尼", EUROPE),
    Country("Austria", "奥地利", "Vienna", "维也纳", EUROPE),
    Country("Greece", "希腊", "Athens", "雅典", EUROPE),
    Country("Poland", "波兰", "Warsaw", "华沙", EUROPE),
    Country("Sweden", "瑞典", "Stockholm", "斯德哥尔摩", EUROPE),
    Country("Norway", "挪威", "Oslo", "奥斯陆", EUROPE),
    Country("Finland", "芬兰", "Helsinki", "赫尔辛基", EUROPE),
    Country("Denmark", "丹麦", "Copenhagen", "哥本哈根", EUROPE),
    Country("Hungary", "匈牙利", "Budapest", "布达佩斯", EUROPE),
    Country("the Czech Republic", "捷克", "Prague", "布拉格", EUROPE),
    Country("China", "中国", "Beijing", "北京", ASIA),
    Country("Japan", "日本", "Tokyo", "东京", ASIA),
    Country("South Korea", "韩国", "Seoul", "首尔", ASIA),
    Country("India", "印度", "New Delhi", "新德里", ASIA),
    Country("Thailand", "泰国", "Bangkok", "曼谷", ASIA),
    Country("Vietnam", "越南", "Hanoi", "河内", ASIA),
    Country("the Philippines", "菲律宾", "Manila", "马尼拉", ASIA),
    Country("Malaysia", "马来西亚", "Kuala Lumpur", "吉隆坡", ASIA),
    Country("Mongolia", "蒙古", "Ulaanbaatar", "乌兰巴托", ASIA),
    Country("Nepal", "尼泊尔", "Kathmandu", "加德满都", ASIA),
    Country("Pakistan", "巴基斯坦", "Islamabad", "伊斯兰堡", ASIA),
    Country("Iran", "伊朗", "Tehran", "德黑兰", ASIA),
    Country("Saudi Arabia", "沙特阿拉伯", "Riyadh", "利雅得", ASIA),
    Country("Egypt", "埃及", "Cairo", "开罗", AFRICA),
    Country("Kenya", "肯尼亚", "Nairobi", "内罗毕", AFRICA),
    Country("Nigeria", "尼日利亚", "Abuja", "阿布贾", AFRICA),
    Country("Ethiopia", "埃塞俄比亚", "Addis Ababa", "亚的斯亚贝巴", AFRICA),
    Country("Morocco", "摩洛哥", "Rabat", "拉巴特", AFRICA),
    Country("Ghana", "加纳", "Accra", "阿克拉", AFRICA),
    Country("Algeria", "阿尔及利亚", "Algiers", "阿尔及尔", AFRICA),
    Country("Senegal", "塞内加尔", "Dakar", "达喀尔", AFRICA),
    Country("the United States", "美国", "Washington, D.C.", "华盛顿", N_AMERICA),
    Country("Canada", "加拿大", "Ottawa", "渥太华", N_AMERICA),
    Country("Mexico", "墨西哥", "Mexico City", "墨西哥城", N_AMERICA),
    Country("Cuba", "古巴", "Havana", "哈瓦那", N_AMERICA),
    Country("Brazil", "巴西", "Brasilia", "巴西利亚", S_AMERICA),
    Country("Argentina", "阿根廷", "Buenos Aires", "布宜诺斯艾利斯", S_AMERICA),
    Country("Chile", "智利", "Santiago", "圣地亚哥", S_AMERICA),
    Country("Peru", "秘鲁", "Lima", "利马", S_AMERICA),
    Country("Colombia", "哥伦比亚", "Bogota", "波哥大", S_AMERICA),
    Country("Venezuela", "委内瑞拉", "Caracas", "加拉加斯", S_AMERICA),
    Country("Australia", "澳大利亚", "Canberra", "堪培拉", OCEANIA),
    Country("New Zealand", "新西兰", "Wellington", "惠灵顿", OCEANIA),
    Country("Fiji", "斐济", "Suva", "苏瓦", OCEANIA),
)


class State(NamedTuple):
    en: str
    zh: str


SOLID = State("solid", "固体")
LIQUID = State("liquid", "液体")
GAS = State("gas", "气体")
STATES: tuple[State, ...] = (SOLID, LIQUID, GAS)


class Element(NamedTuple):
    number: int
    symbol: str
    en: str  # lower case, as used mid-sentence
    zh: str
    state: State  # at room temperature


ELEMENTS: tuple[Element, ...] = (
    Element(1, "H", "hydrogen", "氢", GAS),
    Element(2, "He", "helium", "氦", GAS),
    Element(3, "Li", "lithium", "锂", SOLID),
    Element(4, "Be", "beryllium", "铍", SOLID),
    Element(5, "B", "boron", "硼", SOLID),
    Element(6, "C", "carbon", "碳", SOLID),
    Element(7, "N", "nitrogen", "氮", GAS),
    Element(8, "O", "oxygen", "氧", GAS),
    Element(9, "F", "fluorine", "氟", GAS),
    Element(10, "Ne", "neon", "氖", GAS),
    Element(11, "Na", "sodium", "钠", SOLID),
    Element(12, "Mg", "magnesium", "镁", SOLID),
    Element(13, "Al", "aluminium", "铝", SOLID),
    Element(14, "Si", "silicon", "硅", SOLID),
    Element(15, "P", "phosphorus", "磷", SOLID),
    Element(16, "S", "sulfur", "硫", SOLID),
    Element(17, "Cl", "chlorine", "氯", GAS),
    Element(18, "Ar", "argon", "氩", GAS),
    Element(19, "K", "potassium", "钾", SOLID),
    Element(20, "Ca", "calcium", "钙", SOLID),
    Element(22, "Ti", "titanium", "钛", SOLID),
    Element(24, "Cr", "chromium", "铬", SOLID),
    Element(25, "Mn", "manganese", "锰", SOLID),
    Element(26, "Fe", "iron", "铁", SOLID),
    Element(27, "Co", "cobalt", "钴", SOLID),
    Element(28, "Ni", "nickel", "镍", SOLID),
    Element(29, "Cu", "copper", "铜", SOLID),
    Element(30, "Zn", "zinc", "锌", SOLID),
    Element(35, "Br", "bromine", "溴", LIQUID),
    Element(47, "Ag", "silver", "银", SOLID),
    Element(50, "Sn", "tin", "锡", SOLID),
    Element(53, "I", "iodine", "碘", SOLID),
    Element(78, "Pt", "platinum", "铂", SOLID),
    Element(79, "Au", "gold", "金", SOLID),
    Element(80, "Hg", "mercury", "汞", LIQUID),
    Element(82, "Pb", "lead", "铅", SOLID),
    Element(92, "U", "uranium", "铀", SOLID),
)


class Planet(NamedTuple):
    order: int  # position counted from the Sun
    en: str
    zh: str
    kind_en: str
    kind_zh: str


PLANETS: tuple[Planet, ...] = (
    Planet(1, "Mercury", "水星", "rocky planet", "岩质行星"),
    Planet(2, "Venus", "金星", "rocky planet", "岩质行星"),
    Planet(3, "Earth", "地球", "rocky planet", "岩质行星"),
    Planet(4, "Mars", "火星", "rocky planet", "岩质行星"),
    Planet(5, "Jupiter", "木星", "gas giant", "气态巨行星"),
    Planet(6, "Saturn", "土星", "gas giant", "气态巨行星"),
    Planet(7, "Uranus", "天王星", "ice giant", "冰巨星"),
    Planet(8, "Neptune", "海王星", "ice giant", "冰巨星"),
)

# One extra fact per planet, for prose variety in the pretraining text.
PLANET_NOTES: tuple[tuple[str, str], ...] = (
    (
        "Mercury is the smallest planet and the closest one to the Sun.",
        "水星是最小的行星，也是离太阳最近的行星。",
    ),
    ("Venus is the hottest planet in the Solar System.", "金星是太阳系中最热的行星。"),
    (
        "Earth is the only planet known to have life, and it has one moon.",
        "地球是已知唯一有生命的行星，它有一颗卫星，就是月球。",
    ),
    (
        "Mars is often called the red planet because of its reddish dust.",
        "火星表面有很多红色的尘土，所以常被称为红色星球。",
    ),
    ("Jupiter is the largest planet in the Solar System.", "木星是太阳系中最大的行星。"),
    ("Saturn is famous for its bright rings of ice and rock.", "土星以由冰和岩石组成的美丽光环而闻名。"),
    ("Uranus spins on its side, unlike the other planets.", "天王星几乎是侧躺着自转的，这和其他行星不同。"),
    ("Neptune is the planet farthest from the Sun.", "海王星是离太阳最远的行星。"),
)


class Habitat(NamedTuple):
    en: str  # the short answer word
    en_phrase: str  # "live ___"
    zh: str  # the short answer word
    zh_phrase: str  # "生活在___"


FARM = Habitat("farm", "on farms", "农场", "农场里")
HOME = Habitat("home", "in people's homes", "家", "人们的家里")
POND = Habitat("pond", "in and around ponds", "池塘", "池塘边")
FOREST = Habitat("forest", "in forests", "森林", "森林里")
SAVANNA = Habitat("savanna", "on the savanna", "草原", "草原上")
DESERT = Habitat("desert", "in the desert", "沙漠", "沙漠里")
OCEAN = Habitat("ocean", "in the ocean", "海洋", "海洋里")
ARCTIC = Habitat("Arctic", "in the Arctic", "北极", "北极地区")
ANTARCTICA = Habitat("Antarctica", "in Antarctica", "南极", "南极地区")
BAMBOO = Habitat("bamboo forest", "in bamboo forests", "竹林", "竹林里")
GARDEN = Habitat("garden", "in gardens", "花园", "花园里")
LAKE = Habitat("lake", "near lakes", "湖", "湖边")


class Animal(NamedTuple):
    en: str
    en_plural: str
    zh: str
    zh_measure: str  # the classifier, as in 一只猫 / 一头牛
    sound_en: str | None
    sound_zh: str | None
    legs: int | None  # None where "legs" would be ambiguous (kangaroo, octopus)
    habitat: Habitat
    colour_en: str | None
    colour_zh: str | None


ANIMALS: tuple[Animal, ...] = (
    Animal("cat", "cats", "猫", "只", "meow", "喵喵", 4, HOME, None, None),
    Animal("dog", "dogs", "狗", "条", "woof", "汪汪", 4, HOME, None, None),
    Animal("cow", "cows", "牛", "头", "moo", "哞哞", 4, FARM, None, None),
    Animal("sheep", "sheep", "羊", "只", "baa", "咩咩", 4, FARM, "white", "白色"),
    Animal("pig", "pigs", "猪", "头", "oink", "哼哼", 4, FARM, "pink", "粉色"),
    Animal("horse", "horses", "马", "匹", "neigh", "咴咴", 4, FARM, None, None),
    Animal("duck", "ducks", "鸭子", "只", "quack", "嘎嘎", 2, POND, None, None),
    Animal("chicken", "chickens", "鸡", "只", "cluck", "咯咯", 2, FARM, None, None),
    Animal("frog", "frogs", "青蛙", "只", "croak", "呱呱", 4, POND, "green", "绿色"),
    Animal("lion", "lions", "狮子", "头", "roar", "吼吼", 4, SAVANNA, None, None),
    Animal("tiger", "tigers", "老虎", "只", "growl", "嗷嗷", 4, FOREST, "orange", "橙色"),
    Animal("wolf", "wolves", "狼", "匹", "howl", "嗷呜", 4, FOREST, "grey", "灰色"),
    Animal("owl", "owls", "猫头鹰", "只", "hoot", "咕咕", 2, FOREST, None, None),
    Animal("bee", "bees", "蜜蜂", "只", "buzz", "嗡嗡", 6, GARDEN, "yellow", "黄色"),
    Animal("snake", "snakes", "蛇", "条", "hiss", "嘶嘶", 0, FOREST, None, None),
    Animal("mouse", "mice", "老鼠", "只", "squeak", "吱吱", 4, HOME, "grey", "灰色"),
    Animal("crow", "crows", "乌鸦", "只", "caw", "哇哇", 2, FOREST, "black", "黑色"),
    Animal("elephant", "elephants", "大象", "头", None, None, 4, SAVANNA, "grey", "灰色"),
    Animal("giraffe", "giraffes", "长颈鹿", "只", None, None, 4, SAVANNA, None, None),
    Animal("zebra", "zebras", "斑马", "匹", None, None, 4, SAVANNA, "black and white", "黑白相间"),
    Animal("panda", "pandas", "熊猫", "只", None, None, 4, BAMBOO, "black and white", "黑白相间"),
    Animal("polar bear", "polar bears", "北极熊", "头", None, None, 4, ARCTIC, "white", "白色"),
    Animal("penguin", "penguins", "企鹅", "只", None, None, 2, ANTARCTICA, "black and white", "黑白相间"),
    Animal("whale", "whales", "鲸", "头", None, None, 0, OCEAN, None, None),
    Animal("dolphin", "dolphins", "海豚", "只", None, None, 0, OCEAN, "grey", "灰色"),
    Animal("shark", "sharks", "鲨鱼", "条", None, None, 0, OCEAN, None, None),
    Animal("camel", "camels", "骆驼", "峰", None, None, 4, DESERT, None, None),
    Animal("spider", "spiders", "蜘蛛", "只", None, None, 8, HOME, None, None),
    Animal("ant", "ants", "蚂蚁", "只", None, None, 6, GARDEN, None, None),
    Animal("butterfly", "butterflies", "蝴蝶", "只", None, None, 6, GARDEN, None, None),
    Animal("flamingo", "flamingos", "火烈鸟", "只", None, None, 2, LAKE, "pink", "粉色"),
    Animal("kangaroo", "kangaroos", "袋鼠", "只", None, None, None, SAVANNA, None, None),
    Animal("octopus", "octopuses", "章鱼", "只", None, None, None, OCEAN, None, None),
)


class Unit(NamedTuple):
    big_en: str  # singular
    big_en_plural: str
    small_en: str  # plural; only used with counts above one
    factor: int  # 1 big = factor small
    big_zh: str
    small_zh: str


UNITS: tuple[Unit, ...] = (
    Unit("kilometre", "kilometres", "metres", 1000, "千米", "米"),
    Unit("metre", "metres", "centimetres", 100, "米", "厘米"),
    Unit("centimetre", "centimetres", "millimetres", 10, "厘米", "毫米"),
    Unit("kilogram", "kilograms", "grams", 1000, "千克", "克"),
    Unit("litre", "litres", "millilitres", 1000, "升", "毫升"),
    Unit("hour", "hours", "minutes", 60, "小时", "分钟"),
    Unit("minute", "minutes", "seconds", 60, "分钟", "秒"),
    Unit("day", "days", "hours", 24, "天", "小时"),
    Unit("week", "weeks", "days", 7, "周", "天"),
    Unit("year", "years", "months", 12, "年", "个月"),
    Unit("yuan", "yuan", "jiao", 10, "元", "角"),
)

DAYS: tuple[tuple[str, str], ...] = (
    ("Monday", "星期一"),
    ("Tuesday", "星期二"),
    ("Wednesday", "星期三"),
    ("Thursday", "星期四"),
    ("Friday", "星期五"),
    ("Saturday", "星期六"),
    ("Sunday", "星期日"),
)

# (English, Chinese, days in a common year)
MONTHS: tuple[tuple[str, str, int], ...] = (
    ("January", "一月", 31),
    ("February", "二月", 28),
    ("March", "三月", 31),
    ("April", "四月", 30),
    ("May", "五月", 31),
    ("June", "六月", 30),
    ("July", "七月", 31),
    ("August", "八月", 31),
    ("September", "九月", 30),
    ("October", "十月", 31),
    ("November", "十一月", 30),
    ("December", "十二月", 31),
)

# Things with a typical colour: (English noun phrase, Chinese, colour en, colour zh).
THING_COLOURS: tuple[tuple[str, str, str, str], ...] = (
    ("the sky on a clear day", "晴天的天空", "blue", "蓝色"),
    ("grass", "青草", "green", "绿色"),
    ("fresh snow", "新下的雪", "white", "白色"),
    ("coal", "煤炭", "black", "黑色"),
    ("a ripe banana", "成熟的香蕉", "yellow", "黄色"),
    ("a ripe tomato", "成熟的西红柿", "red", "红色"),
    ("a carrot", "胡萝卜", "orange", "橙色"),
    ("milk", "牛奶", "white", "白色"),
    ("a lemon", "柠檬", "yellow", "黄色"),
    ("the sea", "大海", "blue", "蓝色"),
)

# Word pairs with opposite meanings; every word occurs once so "the opposite of X" is unambiguous.
OPPOSITES: tuple[tuple[str, str, str, str], ...] = (
    ("hot", "cold", "热", "冷"),
    ("big", "small", "大", "小"),
    ("up", "down", "上", "下"),
    ("fast", "slow", "快", "慢"),
    ("happy", "sad", "高兴", "难过"),
    ("day", "night", "白天", "黑夜"),
    ("old", "new", "旧", "新"),
    ("open", "closed", "开", "关"),
    ("left", "right", "左", "右"),
    ("black", "white", "黑", "白"),
    ("full", "empty", "满", "空"),
    ("early", "late", "早", "晚"),
    ("hard", "soft", "硬", "软"),
    ("long", "short", "长", "短"),
    ("high", "low", "高", "低"),
    ("rich", "poor", "富", "穷"),
    ("strong", "weak", "强", "弱"),
    ("inside", "outside", "里", "外"),
)

# Common English words with a Chinese translation: used for string tasks and translation facts.
WORDS: tuple[tuple[str, str], ...] = (
    ("apple", "苹果"),
    ("banana", "香蕉"),
    ("orange", "橙子"),
    ("grape", "葡萄"),
    ("lemon", "柠檬"),
    ("peach", "桃子"),
    ("pear", "梨"),
    ("water", "水"),
    ("bread", "面包"),
    ("rice", "米饭"),
    ("milk", "牛奶"),
    ("tea", "茶"),
    ("coffee", "咖啡"),
    ("egg", "鸡蛋"),
    ("cake", "蛋糕"),
    ("book", "书"),
    ("pen", "钢笔"),
    ("pencil", "铅笔"),
    ("paper", "纸"),
    ("desk", "书桌"),
    ("chair", "椅子"),
    ("table", "桌子"),
    ("window", "窗户"),
    ("door", "门"),
    ("house", "房子"),
    ("school", "学校"),
    ("teacher", "老师"),
    ("student", "学生"),
    ("friend", "朋友"),
    ("family", "家庭"),
    ("mother", "妈妈"),
    ("father", "爸爸"),
    ("sister", "姐妹"),
    ("brother", "兄弟"),
    ("baby", "婴儿"),
    ("city", "城市"),
    ("river", "河流"),
    ("mountain", "山"),
    ("forest", "森林"),
    ("flower", "花"),
    ("tree", "树"),
    ("garden", "花园"),
    ("sun", "太阳"),
    ("moon", "月亮"),
    ("star", "星星"),
    ("cloud", "云"),
    ("rain", "雨"),
    ("snow", "雪"),
    ("wind", "风"),
    ("fire", "火"),
    ("stone", "石头"),
    ("music", "音乐"),
    ("song", "歌曲"),
    ("game", "游戏"),
    ("ball", "球"),
    ("car", "汽车"),
    ("bus", "公共汽车"),
    ("train", "火车"),
    ("plane", "飞机"),
    ("ship", "船"),
    ("bicycle", "自行车"),
    ("road", "道路"),
    ("bridge", "桥"),
    ("market", "市场"),
    ("hospital", "医院"),
    ("doctor", "医生"),
    ("library", "图书馆"),
    ("computer", "电脑"),
    ("phone", "手机"),
    ("clock", "时钟"),
    ("morning", "早上"),
    ("evening", "晚上"),
    ("summer", "夏天"),
    ("winter", "冬天"),
    ("spring", "春天"),
    ("autumn", "秋天"),
    ("happy", "快乐"),
    ("green", "绿色"),
    ("yellow", "黄色"),
    ("purple", "紫色"),
    ("kitchen", "厨房"),
    ("basket", "篮子"),
    ("pocket", "口袋"),
    ("island", "岛屿"),
    ("ocean", "海洋"),
    ("planet", "行星"),
    ("rocket", "火箭"),
    ("robot", "机器人"),
    ("dragon", "龙"),
    ("castle", "城堡"),
    ("honey", "蜂蜜"),
    ("butter", "黄油"),
    ("cheese", "奶酪"),
    ("candle", "蜡烛"),
    ("mirror", "镜子"),
    ("pillow", "枕头"),
    ("blanket", "毯子"),
    ("jacket", "夹克"),
    ("shoe", "鞋子"),
    ("hat", "帽子"),
    ("language", "语言"),
    ("number", "数字"),
    ("letter", "字母"),
    ("question", "问题"),
    ("answer", "答案"),
    ("tomato", "西红柿"),
    ("potato", "土豆"),
    ("carrot", "胡萝卜"),
    ("onion", "洋葱"),
    ("noodle", "面条"),
)

# Fruit used in counting stories: (singular, plural, Chinese, Chinese classifier).
FRUITS: tuple[tuple[str, str, str, str], ...] = (
    ("apple", "apples", "苹果", "个"),
    ("orange", "oranges", "橙子", "个"),
    ("pear", "pears", "梨", "个"),
    ("peach", "peaches", "桃子", "个"),
    ("banana", "bananas", "香蕉", "根"),
    ("lemon", "lemons", "柠檬", "个"),
)

NAMES_EN: tuple[str, ...] = (
    "Tom",
    "Lily",
    "Sam",
    "Anna",
    "Ben",
    "Mia",
    "Leo",
    "Emma",
    "Max",
    "Zoe",
    "Jack",
    "Lucy",
)
NAMES_ZH: tuple[str, ...] = ("小明", "小红", "小刚", "小丽", "小华", "小强", "小美", "小军", "小芳", "小亮")

ZH_DIGITS = "零一二三四五六七八九十"
ORDINALS_EN: tuple[str, ...] = (
    "zeroth",
    "first",
    "second",
    "third",
    "fourth",
    "fifth",
    "sixth",
    "seventh",
    "eighth",
    "ninth",
    "tenth",
    "eleventh",
    "twelfth",
)
NUMBER_WORDS_EN: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
)


def zh_number(n: int) -> str:
    """Chinese numeral for 0 <= n <= 99 (e.g. 12 -> 十二, 40 -> 四十), used for ordinals like 第三."""
    if n <= 10:
        return ZH_DIGITS[n]
    tens, ones = divmod(n, 10)
    head = "十" if tens == 1 else ZH_DIGITS[tens] + "十"
    return head + (ZH_DIGITS[ones] if ones else "")

def add_parser(sub, common):
    sub.add_parser("convert", parents=[common])


def run(args, env):
    raise NotImplementedError

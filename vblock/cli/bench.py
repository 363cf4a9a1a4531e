def add_parser(sub, common):
    sub.add_parser("bench", parents=[common])


def run(args, env):
    raise NotImplementedError

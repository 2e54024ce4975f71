#!/bin/sh
cat /srv/GREETING.txt
